//! Versioned weight sync from the trainer to rollout actors.
//!
//! - Same host: [`WeightPublisher`] writes each version once into a `/dev/shm` segment with two
//!   slots under a seqlock; every [`WeightSubscriber`] maps it and copies the newest complete
//!   version into its model's tensors. Readers never block the publisher and never keep a torn
//!   copy.
//! - Across hosts: [`WeightServer`] streams the newest version in chunks to any [`WeightClient`]
//!   that proves it knows the job token and holds an older version.
//!
//! Versions are the trainer's optimizer-step counts; a restarted publisher has a new
//! generation, and subscribers take its versions even when they are lower.

pub mod bench;
mod error;
mod segment;
mod shm_publisher;
mod shm_subscriber;
mod table;
mod tcp_client;
mod tcp_server;
mod wire;

pub use error::{SyncResult, WeightSyncError};
pub use shm_publisher::{ShmChannel, WeightPublisher};
pub use shm_subscriber::{SyncOutcome, SyncedVersion, WeightSubscriber};
pub use table::{TensorEntry, WeightDtype, WeightTable};
pub use tcp_client::{FetchedWeights, WeightClient, fetch_weights};
pub use tcp_server::{WeightServer, WeightServerConfig};
