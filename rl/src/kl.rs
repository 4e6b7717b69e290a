//! Per-token estimators of KL(π ‖ π_ref) from the sampled tokens' log-probs (Schulman's k1, k2,
//! k3), and the two places a KL penalty can go: subtracted from the rewards before advantages
//! are computed, or added to the loss with a coefficient.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, RlError, check_matrix, check_positive, check_shape};

/// Which per-token estimate of KL(π ‖ π_ref) to use, with `d = log π - log π_ref` on a token
/// sampled from π.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `d`: unbiased, high variance, can be negative (veRL `kl`, OpenRLHF's default in reward).
    K1,
    /// `0.5 d²`: biased, low variance, never negative (veRL `mse`).
    K2,
    /// `exp(-d) + d - 1`: unbiased, low variance, never negative (veRL `low_var_kl`, TRL GRPO).
    /// Computed without veRL's clamps (`d` to ±20, result to ±10), like TRL.
    K3,
}

impl KlEstimator {
    /// The estimate at every position of `log_probs` and `ref_log_probs` (same shape); positions
    /// outside the loss mask are not zeroed here.
    pub fn per_token(self, log_probs: &Tensor, ref_log_probs: &Tensor) -> Result<Tensor> {
        check_shape("reference log-probs", ref_log_probs, &log_probs.size())?;
        let d = log_probs - ref_log_probs;
        Ok(match self {
            Self::K1 => d,
            Self::K2 => d.square() * 0.5,
            Self::K3 => (-&d).exp() + d - 1.0,
        })
    }
}

/// Where the KL penalty acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlPlacement {
    /// `r_t - coef · kl_t` per token before GAE or group statistics (PPO/RLHF, OpenRLHF). The
    /// estimate uses the rollout's (old) log-probs, so it carries no gradient.
    Reward,
    /// `loss_t + coef · kl_t` per token, aggregated like the policy loss (GRPO, TRL, veRL
    /// `use_kl_loss`); differentiable through the current log-probs.
    Loss,
}

/// A KL penalty towards the reference policy: estimator, coefficient and placement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlPenalty {
    pub estimator: KlEstimator,
    pub coef: f64,
    pub placement: KlPlacement,
}

impl KlPenalty {
    /// Fails unless the coefficient is finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        check_positive("kl coef", self.coef, true)
    }

    /// `coef · kl_t`, zero outside `mask`.
    pub fn per_token(&self, log_probs: &Tensor, ref_log_probs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.validate()?;
        check_shape("loss mask", mask, &log_probs.size())?;
        Ok(self.estimator.per_token(log_probs, ref_log_probs)? * mask.to_kind(log_probs.kind()) * self.coef)
    }

    /// Token rewards `[B, T]` minus `coef · kl_t` on the masked tokens (detached). Refused when the
    /// penalty is placed in the loss, so that it is never counted twice.
    pub fn shape_rewards(
        &self,
        token_rewards: &Tensor,
        log_probs: &Tensor,
        ref_log_probs: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        if self.placement != KlPlacement::Reward {
            return Err(RlError::Config {
                name: "kl placement",
                value: self.coef,
                why: "a KL penalty placed in the loss must not also shape the rewards",
            });
        }
        check_matrix("token rewards", token_rewards)?;
        check_shape("log-probs", log_probs, &token_rewards.size())?;
        Ok(token_rewards - self.per_token(log_probs, ref_log_probs, mask)?.detach())
    }
}
