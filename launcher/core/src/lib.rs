//! The contract between rtrain's driver (`rtrain`) and the processes it starts: the job config
//! (the TOML schema and the resolved spec), the control-plane protocol and a client for it, the
//! environment every process gets, the checkpoint format, and the exit codes. Both the launcher
//! and the worker runtime depend on this crate; it links no tensor library.

pub mod checkpoint;
pub mod config;
pub mod contract;
pub mod exit;
pub mod heartbeat;
pub mod job_client;
mod peer_list;
pub mod proto;
