//! All-reduce benchmark on loopback and the memcpy ceiling it is compared with
//! (`rtrain bench allreduce`; `bench/allreduce_gloo.py` is the PyTorch gloo reference).
//!
//! Bandwidths follow nccl-tests: `algbw = size / time`, `busbw = algbw * 2 (n - 1) / n`, the
//! bytes each rank's link carries in a ring all-reduce, comparable across rank counts.

use std::time::{Duration, Instant};

use serde::Serialize;

use tch::{Device, Kind, Tensor};

use super::{
    Collective, CollectiveError, HierarchicalCollective, NcclCollective, ReduceOp, ShmCollective, TcpCollective,
};

/// Timing of one message size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllReduceResult {
    pub backend: &'static str,
    pub algorithm: &'static str,
    pub ranks: usize,
    pub size_bytes: usize,
    /// Median over the timed iterations of the slowest rank's time.
    pub time_s: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
}

/// The backends the benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchBackend {
    Tcp,
    Shm,
    /// One CUDA device per rank (rank r on device r), bootstrapped over the loopback TCP ring.
    Nccl,
}

impl BenchBackend {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(BenchBackend::Tcp),
            "shm" => Some(BenchBackend::Shm),
            "nccl" => Some(BenchBackend::Nccl),
            _ => None,
        }
    }
}

const WARMUP_ITERS: usize = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// NCCL's limit on init and on one timed all-reduce.
const NCCL_TIMEOUT: Duration = Duration::from_secs(120);

/// Times `iters` f32 sum all-reduces per size (after a warm-up) with `ranks` ranks as threads on
/// 127.0.0.1. Sizes are rounded down to whole f32 elements. `shm` is timed twice per size: on a
/// plain buffer (`staged` through the gang's slots) and on a slice of a buffer from
/// `shared_zeros` (`in-place`, the way DDP reduces its gradient buffer). `nccl` puts rank r on CUDA
/// device r; [`crate::cuda::require_cuda`] must have succeeded for each before.
pub fn allreduce_bench(
    backend: BenchBackend,
    ranks: usize,
    sizes_bytes: &[usize],
    iters: usize,
) -> Result<Vec<AllReduceResult>, CollectiveError> {
    allreduce_bench_on_hosts(backend, ranks, 1, &[], sizes_bytes, iters)
}

/// A simulated host with a network of its own: a network namespace (`ip netns`, under
/// /run/netns) and this host's address in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNetns {
    pub name: String,
    pub addr: String,
}

/// Moves the calling thread into the network namespace `name`: the sockets it makes from now on
/// are that host's.
fn enter_netns(name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(std::path::Path::new("/run/netns").join(name))?;
    // SAFETY: setns on an open namespace file only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Rank `rank`'s end of a ring formed across `spaces` (one per host; rank r on host
/// r·hosts/ranks), made in the calling thread, which moves into its host's namespace.
fn join_across(
    rank: usize,
    ranks: usize,
    spaces: &[HostNetns],
    addrs: &std::sync::Mutex<Vec<String>>,
    barrier: &std::sync::Barrier,
) -> Result<TcpCollective, CollectiveError> {
    let host = &spaces[rank * spaces.len() / ranks];
    let io = |op: &'static str| move |source| CollectiveError::Io { op, peer: rank, source };
    let point = enter_netns(&host.name).and_then(|()| TcpCollective::bind(&host.addr)).map_err(io("bind"));
    if let Ok(point) = &point {
        addrs.lock().unwrap_or_else(|p| p.into_inner())[rank] = point.addr().to_string();
    }
    // Every rank reaches the barrier, so that one that failed does not leave the others waiting.
    barrier.wait();
    let peers = addrs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    point?.connect(rank, &peers, "bench token", CONNECT_TIMEOUT)
}

/// [`allreduce_bench`] with the ranks on `hosts` simulated hosts (contiguous, as even as the
/// ranks allow): with more than one, the flat TCP ring over every rank (`flat-ring`) and the
/// host-aware all-reduce (`hierarchical`: shared memory inside a host, a ring between the hosts'
/// leaders) are timed side by side. The hosts share loopback, or, given `spaces` (one per host),
/// each has a network namespace of its own, and traffic between hosts crosses their link.
pub fn allreduce_bench_on_hosts(
    backend: BenchBackend,
    ranks: usize,
    hosts: usize,
    spaces: &[HostNetns],
    sizes_bytes: &[usize],
    iters: usize,
) -> Result<Vec<AllReduceResult>, CollectiveError> {
    let iters = iters.max(1);
    let ranks = ranks.max(1);
    let hosts = if spaces.is_empty() { hosts.clamp(1, ranks) } else { spaces.len().clamp(1, ranks) };
    let spaces = &spaces[..spaces.len().min(hosts)];
    let loopback = match spaces.is_empty() {
        true => TcpCollective::loopback_group(ranks, CONNECT_TIMEOUT)?.into_iter().map(Some).collect(),
        false => (0..ranks).map(|_| None).collect::<Vec<_>>(),
    };
    let (addrs, barrier) = (std::sync::Mutex::new(vec![String::new(); ranks]), std::sync::Barrier::new(ranks));
    let variants: &[&'static str] = match backend {
        _ if hosts > 1 => &["flat-ring", "hierarchical"],
        BenchBackend::Tcp => &["ring"],
        BenchBackend::Shm => &["staged", "in-place"],
        BenchBackend::Nccl => &["nccl"],
    };
    // per_rank[r][v][s][i]: rank r's time for iteration i of size s in variant v.
    let per_rank: Vec<Vec<Vec<Vec<f64>>>> = std::thread::scope(|scope| {
        let joins: Vec<_> = loopback
            .into_iter()
            .enumerate()
            .map(|(rank, tcp)| {
                let (addrs, barrier) = (&addrs, &barrier);
                scope.spawn(move || {
                    let host = rank * hosts / ranks;
                    let (tcp, bind) = match tcp {
                        Some(tcp) => (tcp, "127.0.0.1"),
                        None => (join_across(rank, ranks, spaces, addrs, barrier)?, spaces[host].addr.as_str()),
                    };
                    match hosts {
                        1 => time_rank(backend, tcp, sizes_bytes, iters),
                        _ => time_rank_on_host(tcp, host as u64, bind, sizes_bytes, iters),
                    }
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect::<Result<_, _>>()
    })?;
    let n = ranks.max(1) as f64;
    let mut results = Vec::new();
    for (s, &size) in sizes_bytes.iter().enumerate() {
        for (v, &algorithm) in variants.iter().enumerate() {
            let slowest: Vec<f64> =
                (0..iters).map(|i| per_rank.iter().map(|r| r[v][s][i]).fold(0.0, f64::max)).collect();
            let time_s = median(slowest);
            let algbw = size as f64 / time_s / 1e9;
            results.push(AllReduceResult {
                backend: match backend {
                    _ if hosts > 1 => "hosts",
                    BenchBackend::Tcp => "tcp",
                    BenchBackend::Shm => "shm",
                    BenchBackend::Nccl => "nccl",
                },
                algorithm,
                ranks: ranks.max(1),
                size_bytes: size,
                time_s,
                algbw_gbps: algbw,
                busbw_gbps: algbw * 2.0 * (n - 1.0) / n,
            });
        }
    }
    Ok(results)
}

fn time_rank(
    backend: BenchBackend,
    mut tcp: TcpCollective,
    sizes_bytes: &[usize],
    iters: usize,
) -> Result<Vec<Vec<Vec<f64>>>, CollectiveError> {
    let (device, mut comm): (Device, Box<dyn Collective>) = match backend {
        BenchBackend::Tcp => (Device::Cpu, Box::new(tcp)),
        BenchBackend::Shm => (Device::Cpu, Box::new(ShmCollective::new(tcp)?)),
        BenchBackend::Nccl => {
            let (rank, world) = (tcp.rank(), tcp.world_size());
            let nccl = NcclCollective::new(rank, world, rank, &mut tcp, NCCL_TIMEOUT)?;
            (Device::Cuda(rank), Box::new(nccl))
        }
    };
    // Values grow by the rank count each iteration and may reach inf, which costs the same.
    let plain = sizes_bytes.iter().map(|&size| {
        let mut data = Tensor::ones([size as i64 / 4], (Kind::Float, device));
        time_size(comm.as_mut(), &mut data, iters)
    });
    let mut variants = vec![plain.collect::<Result<Vec<_>, _>>()?];
    if backend == BenchBackend::Shm {
        // One shared buffer of the largest size; each size reduces a slice of it.
        let largest = sizes_bytes.iter().max().copied().unwrap_or(0) as i64 / 4;
        let shared = comm.shared_zeros(largest.max(1), Kind::Float)?.ok_or_else(|| CollectiveError::Unavailable {
            backend: "shm",
            reason: "no shared buffer (see the log)".into(),
        })?;
        let in_place = sizes_bytes.iter().map(|&size| {
            let mut slice = shared.narrow(0, 0, size as i64 / 4);
            let _ = slice.fill_(1.0);
            time_size(comm.as_mut(), &mut slice, iters)
        });
        variants.push(in_place.collect::<Result<Vec<_>, _>>()?);
    }
    Ok(variants)
}

/// One rank on simulated host `host`: the flat ring over every rank, then the host-aware
/// all-reduce built over it.
fn time_rank_on_host(
    mut flat: TcpCollective,
    host: u64,
    bind: &str,
    sizes_bytes: &[usize],
    iters: usize,
) -> Result<Vec<Vec<Vec<f64>>>, CollectiveError> {
    let timed = |comm: &mut dyn Collective| {
        sizes_bytes
            .iter()
            .map(|&size| time_size(comm, &mut Tensor::ones([size as i64 / 4], (Kind::Float, Device::Cpu)), iters))
            .collect::<Result<Vec<_>, _>>()
    };
    let flat_times = timed(&mut flat)?;
    let mut hierarchical = HierarchicalCollective::new(flat, host, bind, "bench token", 1, CONNECT_TIMEOUT)?;
    Ok(vec![flat_times, timed(&mut hierarchical)?])
}

fn time_size(comm: &mut dyn Collective, data: &mut Tensor, iters: usize) -> Result<Vec<f64>, CollectiveError> {
    for _ in 0..WARMUP_ITERS {
        comm.all_reduce(data, ReduceOp::Sum)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        comm.all_reduce(data, ReduceOp::Sum)?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Single-thread `copy_from_slice` bandwidth in GB/s (1e9 bytes/s), best of several copies of
/// `bytes`. Counts each byte once (bytes copied per second, not read + write traffic, which would
/// double it), the same way busbw counts each byte a rank delivers once: a loopback TCP transfer
/// copies every byte at least twice (into and out of the kernel), so this is a hard ceiling.
pub fn memcpy_bandwidth_gbps(bytes: usize) -> f64 {
    let bytes = bytes.max(1);
    let src = vec![1u8; bytes];
    // Written once first, so page faults are not timed.
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let best = (0..5)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    bytes as f64 / best.max(1e-9) / 1e9
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_reports_consistent_bandwidths() {
        let results = allreduce_bench(BenchBackend::Tcp, 2, &[4096, 1 << 20], 3).unwrap();
        assert_eq!(results.len(), 2);
        let shm = allreduce_bench(BenchBackend::Shm, 2, &[4096, 1 << 20], 3).unwrap();
        let algorithms: Vec<_> = shm.iter().map(|r| (r.size_bytes, r.algorithm)).collect();
        assert_eq!(algorithms, [(4096, "staged"), (4096, "in-place"), (1 << 20, "staged"), (1 << 20, "in-place")]);
        let results: Vec<_> = results.into_iter().chain(shm).collect();
        for r in &results {
            assert!(r.time_s > 0.0);
            let algbw = r.size_bytes as f64 / r.time_s / 1e9;
            assert!((r.algbw_gbps - algbw).abs() < 1e-9 * algbw.max(1.0));
            assert!((r.busbw_gbps - r.algbw_gbps).abs() < 1e-9 * algbw.max(1.0), "2 ranks: busbw == algbw");
        }
        assert!(memcpy_bandwidth_gbps(1 << 20) > 0.0);
    }

    #[test]
    fn simulated_hosts_time_the_flat_and_the_hierarchical_all_reduce() {
        let results = allreduce_bench_on_hosts(BenchBackend::Shm, 4, 2, &[], &[4096, 1 << 16], 2).unwrap();
        let seen: Vec<_> = results.iter().map(|r| (r.size_bytes, r.algorithm, r.backend)).collect();
        assert_eq!(
            seen,
            [
                (4096, "flat-ring", "hosts"),
                (4096, "hierarchical", "hosts"),
                (1 << 16, "flat-ring", "hosts"),
                (1 << 16, "hierarchical", "hosts")
            ]
        );
        assert!(results.iter().all(|r| r.time_s > 0.0 && r.busbw_gbps > 0.0));
    }
}
