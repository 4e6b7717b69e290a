//! The coordinator: one per job, serving the control plane over gRPC on loopback. It owns the
//! rendezvous of the current attempt and turns what workers say into [`CoordinatorEvent`]s for
//! the driver's supervision loop.

mod service;

pub use service::{CoordinatorEvent, CoordinatorHandle, start_coordinator};
