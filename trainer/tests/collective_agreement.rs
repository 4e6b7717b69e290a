//! Ranks must agree on every collective call (kind, dtype, reduce op, element count, root); a
//! mismatch fails on every rank, the broadcast root included, on both CPU backends. Each case
//! runs on 2 and 4 ranks (4: ranks that are not ring neighbours of the odd one out).
//!
//! The operation timeout is 60 s and every test must end within 30 s: an error that only came at
//! the timeout fails the test. Reference values are derived in comments.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{BACKENDS, on_backend, within};
use rtrain_trainer::collective::{Collective, CollectiveError, ReduceOp};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(60);

fn ones(n: i64, kind: Kind) -> Tensor {
    Tensor::ones([n], (kind, Device::Cpu))
}

/// One call per rank; rank 0 (or the last rank) calls something else than the others.
type Case = fn(usize, usize, &mut dyn Collective) -> Result<(), CollectiveError>;

const CASES: [(&str, Case); 8] = [
    ("Sum against Avg", |rank, _, comm| {
        comm.all_reduce(&mut ones(8, Kind::Float), if rank == 0 { ReduceOp::Sum } else { ReduceOp::Avg })
    }),
    ("f64 against f32", |rank, _, comm| {
        comm.all_reduce(&mut ones(8, if rank == 0 { Kind::Double } else { Kind::Float }), ReduceOp::Sum)
    }),
    ("9 elements against 8", |rank, _, comm| {
        comm.all_reduce(&mut ones(if rank == 0 { 9 } else { 8 }, Kind::Float), ReduceOp::Sum)
    }),
    ("no elements against 8", |rank, _, comm| {
        comm.all_reduce(&mut ones(if rank == 0 { 0 } else { 8 }, Kind::Float), ReduceOp::Sum)
    }),
    ("barrier against all-reduce", |rank, _, comm| {
        if rank == 0 { comm.barrier() } else { comm.all_reduce(&mut ones(8, Kind::Float), ReduceOp::Sum) }
    }),
    ("broadcast roots 0 and 1", |rank, _, comm| comm.broadcast(&mut ones(4, Kind::Float), usize::from(rank != 0))),
    ("broadcast sizes at the last rank", |rank, world, comm| {
        comm.broadcast(&mut ones(if rank == world - 1 { 5 } else { 4 }, Kind::Float), 0)
    }),
    ("empty broadcast against 4 elements", |rank, _, comm| {
        comm.broadcast(&mut ones(if rank == 1 { 0 } else { 4 }, Kind::Float), 0)
    }),
];

#[test]
fn ranks_that_disagree_fail_on_every_rank() {
    within(Duration::from_secs(30), || {
        for backend in BACKENDS {
            for world in [2, 4] {
                for (name, case) in CASES {
                    let results = on_backend(backend, world, TIMEOUT, move |rank, comm| {
                        case(rank, world, comm).map_err(|e| e.to_string())
                    });
                    let context = format!("{backend:?}, {world} ranks, {name}");
                    for (rank, result) in results.iter().enumerate() {
                        assert!(result.is_err(), "{context}: rank {rank} returned Ok");
                    }
                    let messages: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
                    assert!(messages.iter().any(|m| m.contains("ranks disagree")), "{context}: {messages:?}");
                    assert!(!messages.iter().any(|m| m.contains("timed out")), "{context}: {messages:?}");
                }
            }
        }
    });
}

#[test]
fn shm_refuses_the_mismatch_on_every_rank_itself() {
    // Shared memory shows every rank every announcement: each rank names the disagreement.
    within(Duration::from_secs(30), || {
        for (name, case) in CASES {
            let results = on_backend(common::Backend::Shm, 3, TIMEOUT, move |rank, comm| case(rank, 3, comm));
            for (rank, result) in results.iter().enumerate() {
                let err = result.as_ref().unwrap_err().to_string();
                assert!(err.contains("ranks disagree"), "{name}: rank {rank}: {err}");
            }
        }
    });
}

#[test]
fn zero_length_operations_agree_and_work() {
    within(Duration::from_secs(30), || {
        for backend in BACKENDS {
            let results = on_backend(backend, 3, TIMEOUT, |rank, comm| {
                comm.all_reduce(&mut ones(0, Kind::Float), ReduceOp::Sum).unwrap();
                comm.all_reduce(&mut ones(0, Kind::Double), ReduceOp::Avg).unwrap();
                comm.broadcast(&mut ones(0, Kind::Float), 2).unwrap();
                let gathered = comm.all_gather(&ones(0, Kind::Float)).unwrap();
                assert_eq!(gathered.iter().map(Tensor::numel).collect::<Vec<_>>(), [0, 0, 0]);
                // Still in step: 1 + 2 + 3 on every rank, and rank 1's value broadcast.
                let mut t = Tensor::full([3], rank as f64 + 1.0, (Kind::Float, Device::Cpu));
                comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                let mut b = Tensor::full([2], rank as f64, (Kind::Double, Device::Cpu));
                comm.broadcast(&mut b, 1).unwrap();
                (Vec::<f32>::try_from(&t).unwrap(), Vec::<f64>::try_from(&b).unwrap())
            });
            for (rank, (sum, bcast)) in results.into_iter().enumerate() {
                assert_eq!(sum, vec![6.0; 3], "{backend:?} rank {rank}");
                assert_eq!(bcast, vec![1.0; 2], "{backend:?} rank {rank}");
            }
        }
    });
}
