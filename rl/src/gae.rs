//! Generalised advantage estimation (Schulman et al. 2016) for PPO with a critic.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, RlError, check_matrix, check_shape};

/// GAE's discount `gamma` and trace decay `lambda` (both usually 1.0 for LLM outcome rewards).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gae {
    pub gamma: f64,
    pub lambda: f64,
}

/// GAE's output: per-token advantages and the critic's regression targets, both `[B, T]`.
#[derive(Debug)]
pub struct GaeEstimate {
    /// `A_t = Σ_k (γλ)^k δ_{t+k}`, not whitened (see [`crate::masked_whiten`]); 0 outside the mask.
    pub advantages: Tensor,
    /// `A_t + V_t`, 0 outside the mask.
    pub returns: Tensor,
}

impl Gae {
    /// Advantages and returns from per-token rewards and critic values `[B, T]` under `mask`.
    ///
    /// With `δ_t = r_t + γ V_next - V_t`, where "next" is the next *masked* token of the same row
    /// (0 after the last one): masked-out tokens inside a response (tool output in a multi-turn
    /// rollout) are skipped, as veRL does, and their rewards and values are ignored. For
    /// right-padded single-turn rows this is exactly TRL's recursion. Inputs are detached.
    pub fn estimate(&self, token_rewards: &Tensor, values: &Tensor, mask: &Tensor) -> Result<GaeEstimate> {
        for (name, value) in [("gae gamma", self.gamma), ("gae lambda", self.lambda)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(RlError::Config { name, value, why: "must lie in [0, 1]" });
            }
        }
        let [b, t] = check_matrix("token rewards", token_rewards)?;
        check_shape("values", values, &[b, t])?;
        check_shape("loss mask", mask, &[b, t])?;
        let (rewards, values) = (token_rewards.detach(), values.detach().to_kind(token_rewards.kind()));
        let mask = mask.to_kind(rewards.kind());

        // One column at a time from the end: T small kernels, no host sync.
        let mut next_value = rewards.select(1, 0).zeros_like();
        let mut running = next_value.zeros_like();
        let mut reversed = Vec::with_capacity(t as usize);
        for col in (0..t).rev() {
            let (m, v) = (mask.select(1, col), values.select(1, col));
            let delta = rewards.select(1, col) + &next_value * self.gamma - &v;
            let candidate = delta + &running * (self.gamma * self.lambda);
            let keep = -&m + 1.0;
            next_value = &v * &m + &next_value * &keep;
            running = candidate * &m + &running * &keep;
            reversed.push(running.shallow_clone());
        }
        reversed.reverse();
        let advantages = Tensor::stack(&reversed, 1) * &mask;
        let returns = (&advantages + values) * &mask;
        Ok(GaeEstimate { advantages, returns })
    }
}
