//! Rollouts: the controller on the trainer's rank 0 hands prompts to the rollout actors (the
//! built-in `rollout` role) and gathers their samples; the protocol between them is in [`wire`].

pub mod actor;
pub mod controller;
pub mod wire;

use std::time::Duration;

pub use controller::{RolloutController, RolloutPlan, StepRollouts};

/// Errors of the rollout machinery.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(
        "step {step}: {have} of {want} prompt groups arrived and none came in {waited:?} ({queued} prompts queued, {leased} being generated); are the rollout actors running? (see rollout-*.log in the run directory)"
    )]
    NoProgress { step: u64, have: usize, want: usize, waited: Duration, queued: usize, leased: usize },
}
