//! Outcome rewards placed on tokens, and GRPO's group-normalised advantages.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, RlError, check_matrix, check_positive, check_shape};

/// How a group's rewards are scaled after the group mean is subtracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupScale {
    /// Divide by the unbiased group std (`torch.std`, Bessel-corrected) plus `eps`, as both TRL
    /// and veRL do; the default, so that results match theirs.
    UnbiasedStd,
    /// Divide by the population std (divisor `n`) plus `eps`, the textbook z-score; for small
    /// groups it is smaller than the unbiased std by `sqrt((n-1)/n)`, so advantages are larger.
    PopulationStd,
    /// No scaling: `r - mean_group` (Dr. GRPO), which avoids up-weighting prompts whose rewards
    /// barely vary (too easy or too hard).
    None,
}

/// GRPO advantages: each response's reward compared with the other responses to the same prompt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupAdvantages {
    pub scale: GroupScale,
    /// Added to the std before dividing (veRL 1e-6, TRL 1e-4).
    pub eps: f64,
}

impl Default for GroupAdvantages {
    fn default() -> Self {
        Self { scale: GroupScale::UnbiasedStd, eps: 1e-6 }
    }
}

impl GroupAdvantages {
    /// Per-sequence advantages `[B]` from per-sequence scores `[B]` and each sequence's group id.
    ///
    /// A group of one has no baseline to compare with: its advantage is 0 in every mode (veRL
    /// instead uses mean 0 and std 1 there, i.e. the raw reward). A group whose rewards are all
    /// equal gets 0 too. The result is detached.
    pub fn per_sequence(&self, scores: &Tensor, group_ids: &[u64]) -> Result<Tensor> {
        check_positive("group advantage eps", self.eps, true)?;
        if group_ids.is_empty() {
            return Err(RlError::Empty { what: "batch of scores" });
        }
        check_shape("scores (one per group id)", scores, &[group_ids.len() as i64])?;
        let (kind, device) = (scores.kind(), scores.device());
        let mut dense = HashMap::new();
        let index: Vec<i64> = group_ids
            .iter()
            .map(|id| {
                let next = dense.len() as i64;
                *dense.entry(*id).or_insert(next)
            })
            .collect();
        let index = Tensor::from_slice(&index).to_device(device);
        let groups = Tensor::zeros([dense.len() as i64], (kind, device));
        let scores = scores.detach();

        let counts = groups.index_add(0, &index, &scores.ones_like()).index_select(0, &index);
        let means = groups.index_add(0, &index, &scores).index_select(0, &index) / &counts;
        let centered = &scores - means;
        let sq = groups.index_add(0, &index, &centered.square()).index_select(0, &index);
        let std = match self.scale {
            GroupScale::None => None,
            GroupScale::UnbiasedStd => Some((sq / (&counts - 1.0)).sqrt()),
            GroupScale::PopulationStd => Some((sq / &counts).sqrt()),
        };
        let scaled = match std {
            None => centered,
            Some(std) => {
                // A tied group (std 0, eps 0) or a singleton (unbiased variance 0/0) would divide
                // 0 by 0: divide by 1 instead; `centered` is 0 there.
                let denom = std + self.eps;
                &centered / denom.where_scalarother(&denom.gt(0.0), 1.0)
            }
        };
        Ok(scaled.where_scalarother(&counts.ge(2.0), 0.0))
    }

    /// Per-sequence advantages broadcast over the response tokens `[B, T]`, zero outside `mask`.
    pub fn per_token(&self, scores: &Tensor, group_ids: &[u64], mask: &Tensor) -> Result<Tensor> {
        let per_sequence = self.per_sequence(scores, group_ids)?;
        broadcast_over_tokens(&per_sequence, mask)
    }
}

/// `[B]` per-sequence values repeated on every token of a `[B, T]` mask, zero outside it.
pub fn broadcast_over_tokens(per_sequence: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let [b, _] = check_matrix("loss mask", mask)?;
    check_shape("per-sequence values", per_sequence, &[b])?;
    Ok(per_sequence.unsqueeze(-1) * mask.to_kind(per_sequence.kind()))
}

/// Token rewards `[B, T]` holding each sequence's outcome score on its last masked token and 0
/// elsewhere (the PPO convention); a row without masked tokens gets no reward at all.
pub fn outcome_token_rewards(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let [b, t] = check_matrix("loss mask", mask)?;
    check_shape("scores", scores, &[b])?;
    let mask = mask.to_kind(scores.kind());
    // The largest `position · mask` is the last masked position (positions start at 1).
    let positions = Tensor::arange_start(1, t + 1, (scores.kind(), scores.device()));
    let last = (&mask * positions).argmax(-1, true);
    let rewards = mask.zeros_like().scatter(1, &last, &scores.unsqueeze(-1));
    Ok(rewards * mask)
}

/// Per-sequence sums of token rewards `[B, T] -> [B]` over the masked tokens: the score GRPO
/// normalises when a KL penalty was subtracted from the token rewards (as veRL sums them).
pub fn sequence_rewards(token_rewards: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_matrix("token rewards", token_rewards)?;
    check_shape("loss mask", mask, &token_rewards.size())?;
    Ok((token_rewards * mask.to_kind(token_rewards.kind())).sum_dim_intlist(-1, false, token_rewards.kind()))
}
