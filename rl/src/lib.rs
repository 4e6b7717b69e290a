//! RL post-training numerics for rtrain: the rollout sample schema and its collation into padded
//! tensors.
//!
//! Everything is a pure function of `tch` tensors, device-agnostic.

pub mod batch;
pub mod error;
pub mod logits;
pub mod sample;

pub use batch::{RolloutBatch, collate};
pub use error::{Result, RlError};
pub use logits::{entropy_from_logits, token_log_probs};
pub use sample::{FinishReason, Reward, Sample};
