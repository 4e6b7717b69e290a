//! The parameters as the engine publishes them for weight sync: CPU copies under their names,
//! tagged with the number of optimizer steps that produced them.

use tch::Tensor;

/// How many optimizer steps the weights have taken (restored from checkpoints, so it keeps
/// growing across restarts): a rollout actor compares versions to bound its staleness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WeightVersion(pub u64);

impl std::fmt::Display for WeightVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A copy of the trainable parameters, detached and on the CPU, so training goes on while they
/// are sent.
#[derive(Debug)]
pub struct Weights {
    pub version: WeightVersion,
    /// `(name, tensor)` in the flat buffer's order, under the model's variable names (Hugging
    /// Face names for the built-in models).
    pub tensors: Vec<(String, Tensor)>,
}
