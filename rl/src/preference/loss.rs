//! The preference losses, per pair, as TRL computes them (`DPOTrainer`, `RewardTrainer`; checked
//! against values TRL itself produced, `rl/tests/preference_reference.rs`).
//!
//! With δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)), log-probs summed over
//! each response's tokens (its EOS included):
//! - sigmoid (DPO): −log σ(βδ);
//! - robust DPO with label smoothing ε: (−(1−ε) log σ(βδ) + ε log σ(−βδ)) / (1 − 2ε);
//! - IPO: (δ̄ − 1/(2β))², δ̄ the same difference of log-ratios each divided by its response's
//!   length;
//!
//! and the implicit rewards β(log π − log π_ref) of each response (summed log-probs, every loss).
//! A reward model's loss is Bradley–Terry's −log σ(r_c − r_r − margin).

use rtrain_core::config::preference::DpoLossChoice;
use tch::{Kind, Tensor};

/// Per-pair values `[n]`: the loss (differentiable) and each response's reward (detached; the
/// implicit reward for DPO, the score for a reward model).
#[derive(Debug)]
pub struct PairTerms {
    pub loss: Tensor,
    pub chosen_reward: Tensor,
    pub rejected_reward: Tensor,
}

/// Sequence log-probs `[B]` of the tokens `mask` marks: Σ_t mask[t] · log p(ids[t] | ids[<t]),
/// from `logits` `[B, T, V]` of `ids` `[B, T]` (position t predicts t + 1); the first token,
/// never predicted, must not be marked. Computed in f32 or wider.
pub fn response_log_probs(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let kind = if logits.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let predicting = logits.narrow(1, 0, t - 1).log_softmax(-1, kind);
    let targets = ids.narrow(1, 1, t - 1).unsqueeze(-1);
    let token = predicting.gather(-1, &targets, false).squeeze_dim(-1);
    (token * mask.narrow(1, 1, t - 1).to_kind(kind)).sum_dim_intlist(-1, false, kind)
}

/// The log-probs of a DPO batch's responses under the policy and the reference, summed over
/// each response's tokens, and the responses' lengths (all `[n]`).
#[derive(Debug)]
pub struct DpoLogProbs<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub reference_chosen: &'a Tensor,
    pub reference_rejected: &'a Tensor,
    pub chosen_len: &'a Tensor,
    pub rejected_len: &'a Tensor,
}

/// DPO's per-pair loss and implicit rewards.
pub fn dpo_terms(lp: &DpoLogProbs<'_>, beta: f64, loss: DpoLossChoice, label_smoothing: f64) -> PairTerms {
    let chosen_ratio = lp.policy_chosen - lp.reference_chosen;
    let rejected_ratio = lp.policy_rejected - lp.reference_rejected;
    let delta = &chosen_ratio - &rejected_ratio;
    let loss = match loss {
        DpoLossChoice::Sigmoid => -(&delta * beta).log_sigmoid(),
        DpoLossChoice::Robust => {
            let e = label_smoothing;
            (-(&delta * beta).log_sigmoid() * (1.0 - e) + (-(&delta * beta)).log_sigmoid() * e) / (1.0 - 2.0 * e)
        }
        DpoLossChoice::Ipo => {
            let kind = chosen_ratio.kind();
            let averaged =
                &chosen_ratio / lp.chosen_len.to_kind(kind) - &rejected_ratio / lp.rejected_len.to_kind(kind);
            (averaged - 1.0 / (2.0 * beta)).square()
        }
    };
    PairTerms { loss, chosen_reward: (chosen_ratio * beta).detach(), rejected_reward: (rejected_ratio * beta).detach() }
}

/// A reward model's per-pair Bradley–Terry loss from the scores of the chosen and rejected
/// sequences and each pair's margin (all `[n]`).
pub fn reward_model_terms(chosen: &Tensor, rejected: &Tensor, margin: &Tensor) -> PairTerms {
    let loss = -(chosen - rejected - margin.to_kind(chosen.kind())).log_sigmoid();
    PairTerms { loss, chosen_reward: chosen.detach(), rejected_reward: rejected.detach() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn equal_policy_and_reference_give_log_two_and_zero_rewards() {
        let (c, r, len) = (t(&[-3.0, -1.5]), t(&[-2.0, -4.0]), t(&[3.0, 2.0]));
        let lp = DpoLogProbs {
            policy_chosen: &c,
            policy_rejected: &r,
            reference_chosen: &c,
            reference_rejected: &r,
            chosen_len: &len,
            rejected_len: &len,
        };
        let terms = dpo_terms(&lp, 0.1, DpoLossChoice::Sigmoid, 0.0);
        assert!(terms.loss.allclose(&t(&[2f64.ln(), 2f64.ln()]), 1e-12, 1e-12, false));
        assert_eq!(terms.chosen_reward.abs().max().double_value(&[]), 0.0);
        // Robust DPO keeps log 2 at δ = 0 too: ((1-ε) + ε·(-1)) log 2 / (1 - 2ε).
        let robust = dpo_terms(&lp, 0.1, DpoLossChoice::Robust, 0.2);
        assert!(robust.loss.allclose(&t(&[2f64.ln(), 2f64.ln()]), 1e-12, 1e-12, false));
        // IPO pulls the averaged log-ratio gap towards 1/(2β) = 5.
        let ipo = dpo_terms(&lp, 0.1, DpoLossChoice::Ipo, 0.0);
        assert!(ipo.loss.allclose(&t(&[25.0, 25.0]), 1e-12, 1e-12, false));
    }

    #[test]
    fn response_log_probs_sum_the_marked_tokens_only() {
        // Uniform logits over 4 tokens: every marked token adds log(1/4).
        let logits = Tensor::zeros([2, 5, 4], (Kind::Float, tch::Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 2, 3, 0, 0, 1, 2, 3, 1, 2]).view([2, 5]);
        let mask = Tensor::from_slice(&[0f32, 0., 1., 1., 0., 0., 1., 1., 1., 1.]).view([2, 5]);
        let got = response_log_probs(&logits, &ids, &mask);
        let quarter = (0.25f64).ln();
        assert!(got.allclose(
            &Tensor::from_slice(&[2.0 * quarter, 4.0 * quarter]).to_kind(Kind::Float),
            1e-6,
            1e-6,
            false
        ));
    }

    #[test]
    fn the_margin_moves_the_bradley_terry_loss() {
        let terms = reward_model_terms(&t(&[1.0]), &t(&[0.0]), &t(&[1.0]));
        assert!((terms.loss.double_value(&[0]) - 2f64.ln()).abs() < 1e-12);
        let none = reward_model_terms(&t(&[1.0]), &t(&[0.0]), &t(&[0.0]));
        assert!((none.loss.double_value(&[0]) - (1.0 + (-1f64).exp()).ln()).abs() < 1e-12);
    }
}
