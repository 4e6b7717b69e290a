//! The host-aware collective, ranks as threads on 127.0.0.1 labelled with simulated hosts: rings
//! inside each host (over a real /dev/shm segment) and between the hosts' leaders, built over a
//! real TCP ring of the whole gang. Reference values are the element-wise sums over ranks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{input, within};
use rtrain_trainer::collective::{Collective, HierarchicalCollective, ReduceOp, TcpCollective};
use tch::{Device, Kind, Tensor};

const CONNECT: Duration = Duration::from_secs(20);

/// Runs `f(rank, comm)` on every rank of a gang whose rank r is on host `hosts[r]`.
fn on_hosts<T: Send + 'static>(
    hosts: &[u64],
    f: impl Fn(usize, &mut HierarchicalCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let group = TcpCollective::loopback_group(hosts.len(), CONNECT).unwrap();
    let joins: Vec<_> = group
        .into_iter()
        .zip(hosts.to_vec())
        .enumerate()
        .map(|(rank, (flat, host))| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut comm = HierarchicalCollective::new(flat, host, "127.0.0.1", "a job token", 0, CONNECT).unwrap();
                f(rank, &mut comm)
            })
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}

fn reduce_on(hosts: &'static [u64], n: usize, op: ReduceOp) {
    let world = hosts.len();
    let results = within(Duration::from_secs(60), move || {
        on_hosts(hosts, move |rank, comm| {
            let data: Vec<f32> = (0..n).map(|i| input(rank, i)).collect();
            let mut t = Tensor::from_slice(&data);
            comm.all_reduce(&mut t, op).unwrap();
            (comm.hosts(), Vec::<f32>::try_from(&t).unwrap())
        })
    });
    let divisor = if op == ReduceOp::Avg { world as f64 } else { 1.0 };
    for (rank, (host_count, got)) in results.iter().enumerate() {
        assert_eq!(*host_count, results[0].0);
        // Every rank holds the leader's bits.
        assert_eq!(got, &results[0].1, "rank {rank} differs from rank 0 ({hosts:?})");
        for (i, v) in got.iter().enumerate() {
            let want = (0..world).map(|r| f64::from(input(r, i))).sum::<f64>() / divisor;
            assert!((f64::from(*v) - want).abs() <= 1e-5 * want.abs().max(1.0), "{hosts:?} [{i}]: {v} vs {want}");
        }
    }
}

#[test]
fn sums_match_over_hosts_of_any_shape() {
    // Two hosts of two, interleaved labels, uneven hosts, one host, a host per rank.
    reduce_on(&[7, 7, 9, 9], 1000, ReduceOp::Sum);
    reduce_on(&[1, 2, 1, 2], 257, ReduceOp::Sum);
    reduce_on(&[5, 5, 5, 6, 8], 3000, ReduceOp::Avg);
    reduce_on(&[3, 3, 3], 64, ReduceOp::Avg);
    reduce_on(&[0, 1, 2], 100_003, ReduceOp::Sum);
}

#[test]
fn large_buffers_are_summed_piece_by_piece_with_the_phases_overlapped() {
    // Buffers of several pieces, the last one short: the pipelined path.
    reduce_on(&[4, 4, 2, 2], (5 << 20) / 2 + 7, ReduceOp::Sum);
    reduce_on(&[1, 2, 2], (1 << 17) + 1, ReduceOp::Avg);
}

#[test]
fn broadcast_gather_and_barrier_cover_every_rank() {
    let out = within(Duration::from_secs(60), || {
        on_hosts(&[0, 0, 1, 1], |rank, comm| {
            let mut t = Tensor::full([5], rank as f64, (Kind::Float, Device::Cpu));
            comm.broadcast(&mut t, 2).unwrap();
            let gathered = comm.all_gather(&Tensor::from_slice(&[rank as f32])).unwrap();
            comm.barrier().unwrap();
            (Vec::<f32>::try_from(&t).unwrap(), gathered.iter().map(|g| g.double_value(&[0])).collect::<Vec<_>>())
        })
    });
    for (b, g) in out {
        assert_eq!(b, [2.0; 5]);
        assert_eq!(g, [0.0, 1.0, 2.0, 3.0]);
    }
}
