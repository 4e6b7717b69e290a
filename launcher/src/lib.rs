//! The rtrain driver: the `rtrain` command line, the coordinator, the local agent, the gang
//! scheduler, supervision and the progress view. [`cli::main`] is what the binary runs;
//! [`run_with_loop`] lets a user's own binary be both launcher and worker of a custom loop.

pub mod agent;
pub mod bench;
pub mod ckpt;
pub mod cli;
pub mod coordinator;
pub mod failure;
pub mod infer;
pub mod launch;
pub mod progress;
pub mod run_dir;
pub mod scheduler;
mod worker_env;

pub use cli::run_with_loop;
