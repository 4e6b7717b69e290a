//! Models built from their config and a `tch::nn::Path`.

pub mod gpt;
mod gpt_block;
mod kv_cache;

pub use gpt::{Gpt, GptConfig};
pub use kv_cache::LayerKv;

/// A model config that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config field has a value the model cannot use.
    #[error("invalid model config: {field} {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}
