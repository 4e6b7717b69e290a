//! The TCP ring collective over real sockets on 127.0.0.1, ranks as threads.
//!
//! Reference values are computed directly in the test: the element-wise sum over ranks, in f64,
//! of inputs defined by `input(rank, i)`. Every test runs under a deadline.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{input, within};
use rtrain_trainer::collective::{Collective, CollectiveError, ReduceOp, TcpCollective};
use tch::{Device, Kind, Tensor};

const CONNECT: Duration = Duration::from_secs(10);
const TOKEN: &str = "collective-test-token";

/// Runs `f(rank, comm)` for every rank of a fresh loopback group, each on its own thread.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &mut TcpCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let group = TcpCollective::loopback_group(world, CONNECT).unwrap();
    let joins: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(rank, mut comm)| {
            let f = f.clone();
            std::thread::spawn(move || f(rank, &mut comm))
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}

fn check_all_reduce(world: usize, len: usize, op: ReduceOp) {
    let results = on_ranks(world, move |rank, comm| {
        let mut data: Vec<f32> = (0..len).map(|i| input(rank, i)).collect();
        comm.all_reduce_f32(&mut data, op).unwrap();
        data
    });
    let divisor = if op == ReduceOp::Avg { world as f64 } else { 1.0 };
    for i in 0..len {
        let expected = (0..world).map(|r| f64::from(input(r, i))).sum::<f64>() / divisor;
        let got = f64::from(results[0][i]);
        assert!(
            (got - expected).abs() <= 1e-5 * expected.abs().max(1.0),
            "world {world} len {len} {op:?} [{i}]: {got} vs {expected}"
        );
    }
    for (rank, r) in results.iter().enumerate() {
        let same = r.iter().zip(&results[0]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rank {rank} differs from rank 0: ranks must end with identical bits");
    }
}

#[test]
fn all_reduce_matches_the_direct_sum() {
    within(Duration::from_secs(120), || {
        for world in [2, 3, 4] {
            for len in [1, 7, 1_000_003] {
                for op in [ReduceOp::Sum, ReduceOp::Avg] {
                    check_all_reduce(world, len, op);
                }
            }
        }
    });
}

#[test]
fn all_reduce_on_tensors_in_place() {
    within(Duration::from_secs(30), || {
        let results = on_ranks(3, |rank, comm| {
            let mut t = Tensor::full([5, 7], rank as f64 + 1.0, (Kind::Float, Device::Cpu));
            comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            let mut d = Tensor::full([3], 2.0 * rank as f64, (Kind::Double, Device::Cpu));
            comm.all_reduce(&mut d, ReduceOp::Avg).unwrap();
            (Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), Vec::<f64>::try_from(d).unwrap())
        });
        for (sum, avg) in results {
            assert_eq!(sum, vec![6.0; 35], "1 + 2 + 3");
            assert_eq!(avg, vec![2.0; 3], "(0 + 2 + 4) / 3");
        }
    });
}

#[test]
fn unsupported_tensors_are_refused_before_any_traffic() {
    within(Duration::from_secs(30), || {
        let mut comm = TcpCollective::loopback_group(2, CONNECT).unwrap().remove(0);
        let mut ints = Tensor::ones([4], (Kind::Int64, Device::Cpu));
        let err = comm.all_reduce(&mut ints, ReduceOp::Sum).unwrap_err();
        assert!(matches!(err, CollectiveError::Unsupported { op: "all_reduce", .. }), "{err}");
        let mut strided = Tensor::ones([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let err = comm.all_reduce(&mut strided, ReduceOp::Sum).unwrap_err();
        assert!(err.to_string().contains("contiguous"), "{err}");
    });
}

#[test]
fn broadcast_from_a_non_zero_root() {
    within(Duration::from_secs(60), || {
        for len in [3usize, 3_000_001] {
            let results = on_ranks(3, move |rank, comm| {
                let mut data: Vec<u8> = (0..len).map(|i| if rank == 2 { (i % 251) as u8 } else { 0 }).collect();
                comm.broadcast_bytes(&mut data, 2).unwrap();
                let mut t = Tensor::full([4], rank as f64, (Kind::Float, Device::Cpu));
                comm.broadcast(&mut t, 1).unwrap();
                (data, Vec::<f32>::try_from(t).unwrap())
            });
            for (data, t) in results {
                assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "len {len}");
                assert_eq!(t, vec![1.0; 4]);
            }
        }
    });
}

#[test]
fn all_gather_returns_every_rank_in_order() {
    within(Duration::from_secs(30), || {
        let results = on_ranks(3, |rank, comm| {
            let t = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) + 10.0 * rank as f64;
            let gathered = comm.all_gather(&t).unwrap();
            let mut big = vec![rank as u8; 100_000];
            big[0] = 7;
            let mut out = vec![0u8; 3 * big.len()];
            comm.all_gather_bytes(&big, &mut out).unwrap();
            (gathered, out)
        });
        for (gathered, out) in results {
            assert_eq!(gathered.len(), 3);
            for (r, g) in gathered.iter().enumerate() {
                assert_eq!(g.size(), vec![2, 3]);
                let expected = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) + 10.0 * r as f64;
                assert!(g.equal(&expected), "slot {r}");
            }
            for r in 0..3 {
                let slot = &out[r * 100_000..(r + 1) * 100_000];
                assert_eq!(slot[0], 7);
                assert!(slot[1..].iter().all(|&b| b == r as u8));
            }
        }
    });
}

#[test]
fn barrier_waits_for_the_last_rank() {
    within(Duration::from_secs(30), || {
        let waited = on_ranks(3, |rank, comm| {
            if rank == 2 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let start = Instant::now();
            comm.barrier().unwrap();
            start.elapsed()
        });
        assert!(waited[0] >= Duration::from_millis(250), "rank 0 left the barrier after {:?}", waited[0]);
        assert!(waited[1] >= Duration::from_millis(250), "rank 1 left the barrier after {:?}", waited[1]);
    });
}

#[test]
fn a_world_of_one_is_a_no_op() {
    within(Duration::from_secs(10), || {
        let mut comm = TcpCollective::loopback_group(1, CONNECT).unwrap().remove(0);
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        comm.all_reduce(&mut t, ReduceOp::Avg).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        comm.broadcast(&mut t, 0).unwrap();
        let gathered = comm.all_gather(&t).unwrap();
        assert_eq!(gathered.len(), 1);
        assert!(gathered[0].equal(&t));
        comm.barrier().unwrap();
    });
}

#[test]
fn a_silent_peer_times_out_within_the_timeout() {
    within(Duration::from_secs(30), || {
        for len in [8usize, 4_000_000] {
            let mut group = TcpCollective::loopback_group(2, CONNECT).unwrap();
            let silent = group.pop().unwrap();
            let mut comm = group.pop().unwrap();
            comm.set_timeout(Duration::from_millis(300));
            let mut data = vec![1.0f32; len];
            let start = Instant::now();
            let err = comm.all_reduce_f32(&mut data, ReduceOp::Sum).unwrap_err();
            let elapsed = start.elapsed();
            assert!(
                matches!(err, CollectiveError::Timeout { op: "all_reduce", peer: 1, after } if after == Duration::from_millis(300)),
                "len {len}: {err}"
            );
            assert!(elapsed < Duration::from_millis(1500), "len {len}: took {elapsed:?}");
            // The ring is shut down after a failure; later calls fail at once.
            let err = comm.barrier().unwrap_err();
            assert!(err.to_string().contains("earlier error"), "{err}");
            drop(silent);
        }
    });
}

#[test]
fn a_peer_that_closes_its_sockets_is_an_error_not_a_hang() {
    within(Duration::from_secs(30), || {
        for len in [8usize, 4_000_000] {
            let mut group = TcpCollective::loopback_group(3, CONNECT).unwrap();
            drop(group.pop());
            let started = Instant::now();
            let joins: Vec<_> = group
                .into_iter()
                .map(|mut comm| {
                    std::thread::spawn(move || {
                        let mut data = vec![1.0f32; len];
                        comm.all_reduce_f32(&mut data, ReduceOp::Sum)
                    })
                })
                .collect();
            for j in joins {
                let err = j.join().unwrap().unwrap_err();
                assert!(matches!(err, CollectiveError::Io { .. }), "len {len}: {err}");
            }
            // Default timeout is the connect timeout (10 s): failing fast means EOF was noticed.
            assert!(started.elapsed() < Duration::from_secs(5), "len {len}: took {:?}", started.elapsed());
        }
    });
}

#[test]
fn ranks_that_disagree_on_the_call_fail_with_a_message() {
    within(Duration::from_secs(30), || {
        let results = on_ranks(2, |rank, comm| {
            comm.set_timeout(Duration::from_secs(2));
            let mut data = vec![1.0f32; 100 + rank * 100];
            comm.all_reduce_f32(&mut data, ReduceOp::Sum)
        });
        let messages: Vec<String> = results.into_iter().map(|r| r.unwrap_err().to_string()).collect();
        assert!(messages.iter().all(|m| m.contains("ranks disagree")), "{messages:?}");
    });
}

#[test]
fn stray_and_stale_connections_are_refused() {
    within(Duration::from_secs(30), || {
        let points: Vec<_> = (0..2).map(|_| TcpCollective::bind("127.0.0.1").unwrap().with_session(7)).collect();
        let peers: Vec<String> = points.iter().map(|p| p.addr().to_string()).collect();
        // A client that speaks another protocol, and one from another session, reach rank 1 first.
        let mut stray = TcpStream::connect(&peers[1]).unwrap();
        stray.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let stale_point = TcpCollective::bind("127.0.0.1").unwrap().with_session(6);
        let stale_peers = vec![stale_point.addr().to_string(), peers[1].clone()];
        let stale = std::thread::spawn(move || stale_point.connect(0, &stale_peers, TOKEN, Duration::from_millis(500)));

        let joins: Vec<_> = points
            .into_iter()
            .enumerate()
            .map(|(rank, point)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    let mut comm = point.connect(rank, &peers, TOKEN, CONNECT).unwrap();
                    let mut data = vec![rank as f32 + 1.0; 10];
                    comm.all_reduce_f32(&mut data, ReduceOp::Sum).unwrap();
                    data
                })
            })
            .collect();
        for j in joins {
            assert_eq!(j.join().unwrap(), vec![3.0; 10]);
        }
        let err = stale.join().unwrap().unwrap_err();
        assert!(matches!(err, CollectiveError::Timeout { op: "connect", .. }), "{err}");
    });
}

#[test]
fn connect_gives_up_when_a_peer_never_comes() {
    within(Duration::from_secs(10), || {
        let point = TcpCollective::bind("127.0.0.1").unwrap();
        let absent = TcpCollective::bind("127.0.0.1").unwrap();
        let peers = vec![point.addr().to_string(), absent.addr().to_string()];
        let start = Instant::now();
        let err = point.connect(0, &peers, TOKEN, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, CollectiveError::Timeout { op: "connect", .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
    });
}
