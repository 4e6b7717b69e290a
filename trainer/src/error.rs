//! [`TrainError`]: why a worker's training ended, with the error that caused it kept as its
//! source, and whether the machine or the training code is to blame.

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::collective::CollectiveError;
use crate::config::ConfigError;
use crate::cuda::CudaError;
use crate::data::DataError;
use crate::hf::HfError;
use crate::precision::PrecisionError;
use crate::runtime::ControlError;

/// An error that ends the worker; the runtime reports it to the coordinator, and
/// [`TrainError::is_infrastructure`] decides which restart budget it counts against.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A collective failed: a peer timed out or was lost, or a tensor it cannot carry.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A GPU was asked for but this machine or its PyTorch install cannot provide it.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// libtorch refused a `train.precision` or `train.tf32` setting.
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    /// The job config cannot be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A setting of the job that the training loop cannot use (found once the loop sees its model
    /// or data), named by its dotted key.
    #[error("{key}: {message}")]
    Setting { key: String, message: String },
    /// The training data cannot be read or used.
    #[error("data.source: {0}")]
    Data(#[from] DataError),
    /// A Hugging Face model folder cannot be loaded (`model.path`) or exported (`export`).
    #[error("{context}: {source}")]
    Model {
        context: &'static str,
        #[source]
        source: HfError,
    },
    /// Writing (`checkpoint`, `final checkpoint`) or reading (`resume`) a checkpoint failed.
    #[error("{context}: {source}")]
    Checkpoint {
        context: &'static str,
        #[source]
        source: CheckpointError,
    },
    /// The checkpoint to resume from was written by another model architecture: each entry says
    /// how one fingerprint key differs.
    #[error(
        "{} holds a different model architecture: {}; restore those keys, or pass --fresh to start over",
        path.display(),
        differences.join("; ")
    )]
    ArchitectureMismatch { path: PathBuf, differences: Vec<String> },
    /// A checkpoint's tensors are not the model's: missing, unexpected or misshapen ones.
    #[error("the checkpoint's {file} does not match the model: {}", problems.join("; "))]
    StateMismatch { file: &'static str, problems: Vec<String> },
    /// This rank cannot open the port its peers connect to.
    #[error("cannot open a collective port on {host}: {source}")]
    CollectivePort {
        host: String,
        #[source]
        source: std::io::Error,
    },
    /// The coordinator cannot be reached or refused this worker.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A file the worker reads or writes.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Training diverged: step `step` gave a non-finite `what` (loss, gradient norm, learning
    /// rate). Retrying from the last checkpoint replays the same numbers, so it is not retried.
    #[error(
        "step {step}: the {what} is {value}: training diverged; this step was not checkpointed (the earlier \
         checkpoints are intact); lower train.lr, or check the data and the model's initialisation"
    )]
    NonFinite { step: u64, what: &'static str, value: f64 },
    /// An error of a user's loop that fits no other variant.
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    /// An error of a user's training loop, from its message.
    pub fn other(message: impl Into<String>) -> Self {
        TrainError::Other(message.into())
    }

    /// A setting of the job (`key`, e.g. `user.features`) that the loop cannot use.
    pub fn setting(key: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Setting { key: key.into(), message: message.into() }
    }

    /// Whether the failure is the machine's rather than the training code's: a collective that
    /// timed out or lost its peer (the usual sign that another rank died). Such failures count
    /// against `fault.max_restarts`; every other one against `fault.max_user_restarts`.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            TrainError::Collective(e) => e.is_lost_peer(),
            _ => false,
        }
    }

    /// Whether a restart is bound to fail the same way (a diverged loss replays identically from
    /// the checkpoint): the launcher ends the run instead of spending a restart on it.
    pub fn is_deterministic(&self) -> bool {
        matches!(self, TrainError::NonFinite { .. })
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_lost_peers_are_infrastructure() {
        let timeout = CollectiveError::Timeout { op: "all_reduce", peer: 1, after: Duration::from_secs(1) };
        let io = CollectiveError::Io { op: "broadcast", peer: 0, source: std::io::ErrorKind::ConnectionReset.into() };
        assert!(TrainError::from(timeout).is_infrastructure());
        assert!(TrainError::from(io).is_infrastructure());
        let unsupported = CollectiveError::Unsupported { op: "all_reduce", reason: "int8".into() };
        assert!(!TrainError::from(unsupported).is_infrastructure());
        assert!(!TrainError::other("the loss is NaN").is_infrastructure());
        let nan = TrainError::NonFinite { step: 2, what: "loss", value: f64::NAN };
        assert!(!nan.is_infrastructure() && nan.is_deterministic());
        assert!(nan.to_string().starts_with("step 2: the loss is NaN: training diverged"), "{nan}");
        assert!(!TrainError::setting("user.features", "must be at least 1").is_infrastructure());
    }

    #[test]
    fn a_missing_gpu_or_nccl_is_not_retried_as_infrastructure() {
        let nccl = CollectiveError::Unavailable { backend: "nccl", reason: "rank 1: no libnccl.so.2".into() };
        assert!(!TrainError::from(nccl).is_infrastructure());
        let cuda = CudaError::NoTorchCuda { tried: vec!["/opt/torch/lib/libtorch_cuda.so: no such file".into()] };
        let err = TrainError::from(cuda);
        assert!(!err.is_infrastructure());
        assert!(err.to_string().contains("RTRAIN_TORCH_LIB"), "{err}");
    }

    #[test]
    fn wrapped_errors_stay_reachable_as_sources() {
        let err = TrainError::Checkpoint {
            context: "resume",
            source: CheckpointError::invalid("/run/checkpoints/step-000004", "no trainer_state.json"),
        };
        assert_eq!(err.to_string(), "resume: /run/checkpoints/step-000004: no trainer_state.json");
        assert!(err.source().is_some_and(|s| s.downcast_ref::<CheckpointError>().is_some()));
        let data = TrainError::from(DataError::NoExamples { path: "train.jsonl".into() });
        assert!(data.to_string().starts_with("data.source: train.jsonl"), "{data}");
    }
}
