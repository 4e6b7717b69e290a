//! Helpers shared by the collective tests.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on its own thread and fails the test if it does not finish within `limit`.
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::thread::spawn(f).join());
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Rank `rank`'s input at element `i`: distinct per rank, exact in f32, sums exact in f64.
pub fn input(rank: usize, i: usize) -> f32 {
    ((i.wrapping_mul(2_654_435_761) ^ (rank * 40_503)) % 2048) as f32 / 64.0 - 16.0
}
