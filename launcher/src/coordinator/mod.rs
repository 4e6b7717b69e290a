//! The coordinator: one per job, serving the control plane over gRPC, and the same calls as
//! HTTP/JSON for programs in any language. It owns each role's rendezvous and the address book,
//! routes commands and events to processes, and turns what processes say into
//! [`CoordinatorEvent`]s for the driver's supervision loop.

mod book;
mod http;
mod service;

pub use book::{JobBook, Refusal};
pub(crate) use http::{bearer, note_refusal, same_token};
pub use service::{CoordinatorEvent, CoordinatorHandle, CoordinatorSetup, serve_coordinator, start_coordinator};
