//! RL post-training numerics for rtrain: the rollout sample schema and its collation, GRPO and
//! GAE advantages, KL estimators, PPO policy and value losses, and loss aggregation whose scale
//! never depends on how a batch is split across ranks or micro-batches; and versioned weight sync
//! from the trainer to rollout actors (shared memory on one host, TCP across hosts); and the
//! rewards that score rollouts (verifiable built-ins, a remote endpoint, custom [`RewardFn`]s).
//!
//! Everything is a pure function of `tch` tensors, device-agnostic; conventions follow veRL and
//! TRL, and each place they differ is documented where the choice is made.

pub mod advantages;
pub mod aggregation;
pub mod batch;
pub mod error;
pub mod gae;
pub mod kl;
pub mod logits;
pub mod masked;
pub mod policy_loss;
pub mod preference;
pub mod programs;
pub mod prompts;
pub mod reward;
pub mod rollout;
mod run_file;
pub mod sample;
pub mod trainer;
pub mod value_loss;
pub mod weight_sync;

pub use advantages::{GroupAdvantages, GroupScale, broadcast_over_tokens, outcome_token_rewards, sequence_rewards};
pub use aggregation::{LossAggregation, LossNormaliser};
pub use batch::{RolloutBatch, collate};
pub use error::{Result, RlError};
pub use gae::{Gae, GaeEstimate};
pub use kl::{KlEstimator, KlPenalty, KlPlacement};
pub use logits::{entropy_from_logits, token_log_probs};
pub use masked::{masked_mean, masked_sum, masked_var, masked_whiten};
pub use policy_loss::{PolicyBatch, PolicyLoss, PolicyLossConfig, tis_weights};
pub use reward::{RewardError, RewardFn, RewardInput, Scored, build_reward};
pub use sample::{FinishReason, Reward, Sample};
pub use value_loss::{ValueLoss, ValueLossConfig};
pub use weight_sync::{
    FetchedWeights, ShmChannel, SyncOutcome, SyncedVersion, WeightClient, WeightPublisher, WeightServer,
    WeightServerConfig, WeightSubscriber, WeightSyncError, fetch_weights,
};
