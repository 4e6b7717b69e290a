//! PPO's clipped surrogate for the policy, with asymmetric clipping (DAPO's clip-higher),
//! optional dual clipping, truncated importance sampling against the behaviour policy and an
//! optional KL term, following veRL's `compute_policy_loss_vanilla`.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::aggregation::{LossAggregation, LossNormaliser};
use crate::error::{Result, RlError, check_matrix, check_positive, check_shape};
use crate::kl::{KlPenalty, KlPlacement};

/// The policy loss's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyLossConfig {
    /// ε_low: the ratio is clipped below at `1 - clip_low` (0.2 in PPO).
    pub clip_low: f64,
    /// ε_high: the ratio is clipped above at `1 + clip_high` (0.28 in DAPO's clip-higher).
    pub clip_high: f64,
    /// Dual-clip constant `c > 1` (Ye et al. 2020): for negative advantages the loss is capped at
    /// `-c · A`, so a huge ratio on a bad token cannot blow the update up. veRL's default is 3.
    pub dual_clip: Option<f64>,
    /// Truncated importance sampling cap `C`: each token's loss is weighted by
    /// `min(exp(old_logp - behaviour_logp), C)` to correct for the rollout engine's log-probs
    /// differing from the trainer's (veRL's TIS); `None` disables it.
    pub tis_cap: Option<f64>,
    /// KL towards the reference policy added to the loss; its placement must be `Loss`.
    pub kl: Option<KlPenalty>,
    pub aggregation: LossAggregation,
}

/// The per-token inputs of one micro-batch, all `[B, T]`.
#[derive(Debug, Clone, Copy)]
pub struct PolicyBatch<'a> {
    /// log π_θ(y_t) under the current parameters: the only input that carries gradient.
    pub log_probs: &'a Tensor,
    /// log π_old(y_t) computed by the trainer before the first update on this batch.
    pub old_log_probs: &'a Tensor,
    pub advantages: &'a Tensor,
    pub mask: &'a Tensor,
    /// log-probs reported by the rollout engine; required when `tis_cap` is set.
    pub behaviour_log_probs: Option<&'a Tensor>,
    /// log π_ref(y_t); required when `kl` is set.
    pub ref_log_probs: Option<&'a Tensor>,
}

/// The loss and its diagnostics. Scalars are this micro-batch's shares of the global-batch
/// value (see [`LossNormaliser`]): summing them over micro-batches and ranks gives the global one.
#[derive(Debug)]
pub struct PolicyLoss {
    /// `pg_loss + kl_loss`: the tensor to call `backward` on.
    pub loss: Tensor,
    /// The clipped surrogate, aggregated.
    pub pg_loss: Tensor,
    /// `coef · KL`, aggregated like the surrogate; `None` without a KL term.
    pub kl_loss: Option<Tensor>,
    /// Fraction of loss tokens whose clipped branch is active (token-mean share, detached).
    pub clip_fraction: Tensor,
    /// Fraction of loss tokens capped by dual clipping (token-mean share, detached).
    pub dual_clip_fraction: Tensor,
    /// `mean(old_logp - logp)` over loss tokens (veRL's `ppo_kl`, the k1 estimate of
    /// KL(π_old ‖ π_θ); token-mean share, detached). Exactly 0 on the first update of a batch.
    pub approx_kl: Tensor,
    /// `exp(logp - old_logp)` per token (detached).
    pub ratio: Tensor,
    /// The truncated importance weights per token, when enabled (detached).
    pub tis_weights: Option<Tensor>,
}

impl PolicyLossConfig {
    /// Fails on clip ranges, caps or coefficients that make no sense.
    pub fn validate(&self) -> Result<()> {
        check_positive("clip_low", self.clip_low, true)?;
        if self.clip_low >= 1.0 {
            return Err(RlError::Config { name: "clip_low", value: self.clip_low, why: "must be below 1" });
        }
        check_positive("clip_high", self.clip_high, true)?;
        if let Some(c) = self.dual_clip
            && !(c.is_finite() && c > 1.0)
        {
            return Err(RlError::Config { name: "dual_clip", value: c, why: "must be a finite number above 1" });
        }
        if let Some(cap) = self.tis_cap {
            check_positive("tis_cap", cap, false)?;
        }
        if let Some(kl) = &self.kl {
            kl.validate()?;
            if kl.placement != KlPlacement::Loss {
                return Err(RlError::Config {
                    name: "kl placement",
                    value: kl.coef,
                    why: "a KL penalty placed in the reward must not also be added to the loss",
                });
            }
        }
        Ok(())
    }

    /// This micro-batch's share of the policy loss and its metrics.
    pub fn compute(&self, batch: &PolicyBatch<'_>, norm: &LossNormaliser) -> Result<PolicyLoss> {
        self.validate()?;
        let shape = check_matrix("log-probs", batch.log_probs)?;
        check_shape("old log-probs", batch.old_log_probs, &shape)?;
        check_shape("advantages", batch.advantages, &shape)?;
        check_shape("loss mask", batch.mask, &shape)?;
        let kind = batch.log_probs.kind();
        let mask = batch.mask.to_kind(kind);
        let advantages = batch.advantages.detach().to_kind(kind);
        let old = batch.old_log_probs.detach().to_kind(kind);

        // veRL clamps the log-ratio to ±20 so that exp cannot overflow; identical otherwise.
        let log_ratio = (batch.log_probs - &old).clamp(-20.0, 20.0);
        let ratio = log_ratio.exp();
        let unclipped = -&advantages * &ratio;
        let clipped = -&advantages * ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high);
        let clip_active = clipped.gt_tensor(&unclipped);
        let mut per_token = unclipped.maximum(&clipped);
        let mut dual_active = per_token.zeros_like().gt(0.0);
        if let Some(c) = self.dual_clip {
            let cap = -&advantages * c;
            let negative = advantages.lt(0.0);
            dual_active = per_token.gt_tensor(&cap).logical_and(&negative);
            per_token = per_token.minimum(&cap).where_self(&negative, &per_token);
        }
        let tis_weights = match self.tis_cap {
            Some(cap) => {
                let behaviour = batch.behaviour_log_probs.ok_or(RlError::Config {
                    name: "tis_cap",
                    value: cap,
                    why: "truncated importance sampling needs the behaviour log-probs",
                })?;
                check_shape("behaviour log-probs", behaviour, &shape)?;
                Some(tis_weights(&old, &behaviour.to_kind(kind), cap)?)
            }
            None => None,
        };
        let per_token = match &tis_weights {
            Some(weights) => per_token * weights,
            None => per_token,
        };
        let pg_loss = self.aggregation.aggregate(&per_token, &mask, norm)?;

        let kl_loss = match &self.kl {
            Some(kl) => {
                let reference = batch.ref_log_probs.ok_or(RlError::Config {
                    name: "kl coef",
                    value: kl.coef,
                    why: "a KL term in the loss needs the reference log-probs",
                })?;
                let per_token_kl = kl.per_token(batch.log_probs, &reference.detach().to_kind(kind), &mask)?;
                Some(self.aggregation.aggregate(&per_token_kl, &mask, norm)?)
            }
            None => None,
        };
        let loss = match &kl_loss {
            Some(kl) => &pg_loss + kl,
            None => pg_loss.shallow_clone(),
        };

        let token_share = |t: &Tensor| (t.detach().to_kind(kind) * &mask).sum(kind) / norm.tokens();
        Ok(PolicyLoss {
            loss,
            pg_loss,
            kl_loss,
            clip_fraction: token_share(&clip_active),
            dual_clip_fraction: token_share(&dual_active),
            approx_kl: token_share(&-log_ratio),
            ratio: ratio.detach(),
            tis_weights,
        })
    }
}

/// Truncated importance weights `min(exp(old_logp - behaviour_logp), cap)` per token, detached:
/// the trainer's old policy over the rollout engine's behaviour policy, capped to bound variance.
pub fn tis_weights(old_log_probs: &Tensor, behaviour_log_probs: &Tensor, cap: f64) -> Result<Tensor> {
    check_positive("tis_cap", cap, false)?;
    check_shape("behaviour log-probs", behaviour_log_probs, &old_log_probs.size())?;
    Ok((old_log_probs - behaviour_log_probs).detach().exp().clamp_max(cap))
}
