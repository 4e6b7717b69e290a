//! The RL trainers (`train.trainer = "grpo"` or `"ppo"`), run by the trainer gang, and what they share with
//! the rollout actors.

mod critic;
mod eval;
mod grpo;
mod rank0;
mod setup;

pub use eval::{EvalResult, evaluate};
pub use grpo::RlLoop;
pub use setup::{RlSetup, SetupError, policy_channel};
