//! Weight sync throughput against the memcpy ceiling, measured side by side in one run: the
//! trainer's publish and an actor's sync through shared memory, and a fetch over loopback TCP.
//!
//! Rounds interleave memcpy, publish and sync, so load that comes and goes on a shared machine
//! falls on all of them.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::error::SyncResult;
use super::shm_publisher::{ShmChannel, WeightPublisher};
use super::shm_subscriber::{SyncOutcome, WeightSubscriber};
use super::tcp_client::WeightClient;
use super::tcp_server::{WeightServer, WeightServerConfig};

/// One transport at one weight-set size. Times are medians over the rounds, in seconds.
#[derive(Debug, Clone)]
pub struct WeightSyncBench {
    pub transport: &'static str,
    /// Bytes of tensor data per version.
    pub bytes: u64,
    pub tensors: usize,
    /// Trainer side: writing one version (into the segment, or into the server's image).
    pub publish_s: f64,
    /// Actor side: loading one new version into the model's tensors.
    pub sync_s: f64,
    /// The actor's first sync (shm: includes mapping the segment).
    pub first_sync_s: f64,
    /// Single-thread memcpy of the same bytes, timed in the same rounds.
    pub memcpy_s: f64,
}

impl WeightSyncBench {
    pub fn sync_gbps(&self) -> f64 {
        self.bytes as f64 / self.sync_s.max(1e-12) / 1e9
    }
    pub fn publish_gbps(&self) -> f64 {
        self.bytes as f64 / self.publish_s.max(1e-12) / 1e9
    }
    pub fn memcpy_gbps(&self) -> f64 {
        self.bytes as f64 / self.memcpy_s.max(1e-12) / 1e9
    }
    /// The figure the weight-sync target (docs/DESIGN.md §11.11) is set against (≥ 0.5 for shm).
    pub fn sync_vs_memcpy(&self) -> f64 {
        self.memcpy_s / self.sync_s.max(1e-12)
    }
}

/// A model-like weight set of about `bytes` (a whole number of layers): 4 MiB matrices alternating f32 `[1024, 1024]` and
/// bf16 `[1024, 2048]`, each with an f32 `[1024]` bias.
pub fn bench_weights(bytes: u64) -> Vec<(String, Tensor)> {
    let per_layer = (4 << 20) + 4096;
    let layers = ((bytes + per_layer / 2) / per_layer).max(1);
    let mut out = Vec::new();
    for i in 0..layers {
        let (kind, shape) = if i % 2 == 0 { (Kind::Float, [1024, 1024]) } else { (Kind::BFloat16, [1024, 2048]) };
        out.push((format!("layers.{i}.weight"), Tensor::full(shape, i as f64, (kind, Device::Cpu))));
        out.push((format!("layers.{i}.bias"), Tensor::full([1024], i as f64, (Kind::Float, Device::Cpu))));
    }
    out
}

/// Runs shm and TCP for a weight set of about `bytes`, `rounds` versions each (at least 1).
pub fn weight_sync_bench(bytes: u64, rounds: usize) -> SyncResult<Vec<WeightSyncBench>> {
    let weights = bench_weights(bytes);
    let total: u64 = weights.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
    let rounds = rounds.max(1);
    let mut memcpy = Memcpy::new(total as usize);
    Ok(vec![shm(&weights, total, rounds, &mut memcpy)?, tcp(&weights, total, rounds, &mut memcpy)?])
}

fn shm(weights: &[(String, Tensor)], total: u64, rounds: usize, memcpy: &mut Memcpy) -> SyncResult<WeightSyncBench> {
    let channel = ShmChannel::new(&format!("bench{}", std::process::id()), "policy")?;
    let mut publisher = WeightPublisher::create(&channel, weights)?;
    let mut subscriber = WeightSubscriber::new(&channel);
    let mut model = zeros_like(weights);
    publisher.publish(0, weights)?;
    let first_sync_s = timed(|| subscriber.sync_into(&mut model))?.0;
    let (mut publish, mut sync, mut copy) = (Vec::new(), Vec::new(), Vec::new());
    for v in 1..=rounds as u64 {
        copy.push(memcpy.time());
        publish.push(timed(|| publisher.publish(v, weights))?.0);
        let (s, outcome) = timed(|| subscriber.sync_into(&mut model))?;
        debug_assert!(matches!(outcome, SyncOutcome::Loaded { .. }));
        sync.push(s);
    }
    Ok(WeightSyncBench {
        transport: "shm",
        bytes: total,
        tensors: weights.len(),
        publish_s: median(publish),
        sync_s: median(sync),
        first_sync_s,
        memcpy_s: median(copy),
    })
}

fn tcp(weights: &[(String, Tensor)], total: u64, rounds: usize, memcpy: &mut Memcpy) -> SyncResult<WeightSyncBench> {
    let token = b"bench-token".to_vec();
    let mut server = WeightServer::start(WeightServerConfig::new(([127, 0, 0, 1], 0).into(), token.clone()))?;
    let client = WeightClient::new(server.local_addr(), token);
    let mut model = zeros_like(weights);
    server.publish(0, weights)?;
    let (first_sync_s, _) = timed(|| client.fetch_into(None, &mut model))?;
    let (mut publish, mut sync, mut copy) = (Vec::new(), Vec::new(), Vec::new());
    let mut held = None;
    for v in 1..=rounds as u64 {
        copy.push(memcpy.time());
        publish.push(timed(|| server.publish(v, weights))?.0);
        let (s, outcome) = timed(|| client.fetch_into(held, &mut model))?;
        if let SyncOutcome::Loaded { version, .. } = outcome {
            held = Some(version);
        }
        sync.push(s);
    }
    Ok(WeightSyncBench {
        transport: "tcp",
        bytes: total,
        tensors: weights.len(),
        publish_s: median(publish),
        sync_s: median(sync),
        first_sync_s,
        memcpy_s: median(copy),
    })
}

fn zeros_like(weights: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    weights.iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect()
}

fn timed<T>(f: impl FnOnce() -> SyncResult<T>) -> SyncResult<(f64, T)> {
    let start = Instant::now();
    let out = f()?;
    Ok((start.elapsed().as_secs_f64(), out))
}

/// Single-thread `copy_from_slice` between two buffers written once first (so page faults are
/// not timed): the ceiling a one-threaded sync is compared with.
struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Memcpy {
    fn new(bytes: usize) -> Self {
        let src = vec![1u8; bytes];
        let mut dst = vec![0u8; bytes];
        dst.copy_from_slice(&src);
        Memcpy { src, dst }
    }

    fn time(&mut self) -> f64 {
        let start = Instant::now();
        self.dst.copy_from_slice(std::hint::black_box(&self.src));
        std::hint::black_box(&mut self.dst);
        start.elapsed().as_secs_f64()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[mid],
        _ => (values[mid - 1] + values[mid]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn bench_reports_consistent_figures() {
        let rows = weight_sync_bench(8 << 20, 2).unwrap();
        assert_eq!(rows.iter().map(|r| r.transport).collect::<Vec<_>>(), ["shm", "tcp"]);
        for r in &rows {
            assert_eq!(r.bytes, 2 * ((4 << 20) + 4096));
            assert!(r.sync_s > 0.0 && r.publish_s > 0.0 && r.memcpy_s > 0.0, "{r:?}");
            assert!((r.sync_vs_memcpy() - r.sync_gbps() / r.memcpy_gbps()).abs() < 1e-9);
        }
    }
}
