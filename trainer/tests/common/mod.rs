//! Helpers shared by the collective tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;

use rtrain_trainer::collective::{Collective, ShmCollective, TcpCollective};

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

/// The CPU backends; tests that hold for both run once per backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Tcp,
    Shm,
}

pub const BACKENDS: [Backend; 2] = [Backend::Tcp, Backend::Shm];

/// Runs `f(rank, comm)` for every rank of a fresh `backend` group on 127.0.0.1, each rank on its
/// own thread. `timeout` is every operation's wait limit.
pub fn on_backend<T: Send + 'static>(
    backend: Backend,
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, &mut dyn Collective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let group = TcpCollective::loopback_group(world, timeout).unwrap();
    let joins: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(rank, tcp)| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut comm: Box<dyn Collective> = match backend {
                    Backend::Tcp => Box::new(tcp),
                    Backend::Shm => Box::new(ShmCollective::with_slot_bytes(tcp, 4096).unwrap()),
                };
                f(rank, comm.as_mut())
            })
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}
