//! The worker side of rtrain: the job config, the control-plane client, collectives, DDP, the
//! training [`engine`], models, and the [`TrainLoop`] trait that built-in and custom training
//! loops implement (most through the engine's [`TrainStep`]).

pub mod builtin;
pub mod cli;
pub mod collective;
pub mod cuda;
pub mod data;
pub mod ddp;
pub mod engine;
pub mod error;
pub mod hf;
pub mod lm;
pub mod model;
pub mod optim;
pub mod precision;
pub mod runtime;
pub mod sft;
pub mod snapshot;
pub mod torch_extras;
pub mod train_loop;

pub use engine::{Engine, MicroLoss, StepLoop, TrainStep};
/// The job config, the control-plane protocol and the checkpoint format are shared with the
/// launcher.
pub use rtrain_core::{checkpoint, config, proto};
pub use train_loop::{Fingerprint, LoopState, StepOutput, TrainContext, TrainError, TrainLoop};
