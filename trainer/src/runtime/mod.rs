//! The worker runtime: environment contract, control-plane client and the step driver.

mod checkpointer;
mod control;
mod env;
mod worker;

pub use control::{ControlError, ControlPlane};
pub use env::{EnvError, WorkerEnv, vars};
pub use worker::{EXIT_BAD_START, EXIT_TRAIN_FAILED, model_keys, run_worker, unix_now};
