//! Flat parameter buffers, AdamW and learning-rate schedules.

pub mod adamw;
pub mod flat;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use flat::{FlatEntry, FlatParams};
pub use schedule::LrSchedule;
