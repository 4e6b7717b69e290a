//! RL post-training for rtrain (rollout actors, rewards, GRPO/PPO, weight sync).
//!
//! Not implemented yet: this crate reserves its place in the workspace layout.
