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
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod contract;
pub mod coordinator;
pub mod failure;
pub mod job_client;
pub mod launch;
pub mod progress;
pub mod proto;
pub mod run_dir;
pub mod scheduler;
mod worker_env;
