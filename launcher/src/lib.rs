//! The rtrain driver: the `rtrain` command line, the coordinator, the local agent, the gang
//! scheduler, supervision and the progress view, and what the driver shares with its workers:
//! the job config, the control-plane protocol, the worker environment and the checkpoint format.
//! [`cli::main`] is what the `rtrain` binary runs.
//!
//! Nothing here links libtorch, so `rtrain` starts in milliseconds; the commands that need tensors
//! (a built-in worker, `generate`, `score`, some benchmarks) run in the `rtrain-worker` binary,
//! which `rtrain` executes for them.

pub mod agent;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod coordinator;
pub mod dashboard;
pub mod failure;
pub mod host_agent;
pub mod hosts;
pub mod k8s;
pub mod launch;
pub mod plot;
pub mod progress;
pub mod run_dir;
pub mod run_lock;
pub mod scheduler;
pub mod slurm;
pub mod tensorboard;
mod worker_env;
pub mod working_dir;

/// The contract with the processes the launcher starts, from `rtrain-core`.
pub use rtrain_core::{checkpoint, config, contract, exit, heartbeat, job_client, proto};
