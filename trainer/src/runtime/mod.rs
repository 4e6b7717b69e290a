//! The worker runtime: environment contract, control-plane client and the step driver.

mod checkpoint_writer;
mod control;
mod resume;
mod worker;

pub use control::{ControlError, ControlPlane};
pub use resume::fingerprint_differences;
pub use rtrain_core::contract::{EnvError, WorkerEnv, unix_now, vars};
pub use rtrain_core::job_client::{AddressBook, Endpoint, JobClient, JobClientError, JobCommand};
pub use worker::{EXIT_BAD_START, EXIT_TRAIN_FAILED, init_logging, run_worker};
