//! PPO's clipped value loss for the critic (veRL's `compute_value_loss`).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::aggregation::{LossAggregation, LossNormaliser};
use crate::error::{Result, check_matrix, check_positive, check_shape};

/// The critic loss's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValueLossConfig {
    /// ε_v: new values are clipped to `old ± clip` in the pessimistic branch; `None` disables it.
    pub clip: Option<f64>,
    pub aggregation: LossAggregation,
}

/// The critic loss share and its clip fraction share (see [`LossNormaliser`]).
#[derive(Debug)]
pub struct ValueLoss {
    /// `0.5 · agg(max((V - R)², (clip(V, V_old ± ε_v) - R)²))`.
    pub loss: Tensor,
    /// Fraction of loss tokens where the clipped branch is the larger (detached).
    pub clip_fraction: Tensor,
}

impl ValueLossConfig {
    /// This micro-batch's share of the value loss; `values` carries the gradient, `old_values`
    /// (the critic at rollout time) and `returns` are detached. All `[B, T]`.
    pub fn compute(
        &self,
        values: &Tensor,
        old_values: &Tensor,
        returns: &Tensor,
        mask: &Tensor,
        norm: &LossNormaliser,
    ) -> Result<ValueLoss> {
        let shape = check_matrix("values", values)?;
        check_shape("old values", old_values, &shape)?;
        check_shape("returns", returns, &shape)?;
        check_shape("loss mask", mask, &shape)?;
        let kind = values.kind();
        let (old, returns, mask) =
            (old_values.detach().to_kind(kind), returns.detach().to_kind(kind), mask.to_kind(kind));
        let unclipped = (values - &returns).square();
        let (per_token, clip_fraction) = match self.clip {
            Some(eps) => {
                check_positive("value clip", eps, true)?;
                // Clamp V itself (not old + clamp(V - old)) so that V within the band is passed through
                // bit for bit and never counts as clipped by rounding.
                let clipped_values = values.maximum(&(&old - eps)).minimum(&(&old + eps));
                let clipped = (clipped_values - &returns).square();
                let active = clipped.gt_tensor(&unclipped).to_kind(kind);
                (unclipped.maximum(&clipped), (active * &mask).sum(kind) / norm.tokens())
            }
            None => (unclipped, Tensor::zeros([], (kind, values.device()))),
        };
        Ok(ValueLoss { loss: self.aggregation.aggregate(&per_token, &mask, norm)? * 0.5, clip_fraction })
    }
}
