//! What a worker process gets from the launcher: the torchrun environment plus rtrain's own
//! variables, its CPU cores, and the job's token and rendezvous port.

use crate::contract::{WorkerEnv, unix_now};
use crate::scheduler::{RankPlacement, device_list};

/// The environment of rank `p` of a role placed as `all`: the role's `env` (what every process of
/// the role's attempt is told) with the rank's own numbers, threads and devices. OMP_NUM_THREADS
/// follows the cores it was given, unless the launcher's own environment sets it.
/// `visible_devices` are the GPUs of `p`'s host, which placement indices refer to; `cuda` gives
/// the process CUDA_VISIBLE_DEVICES even without GPUs of its own. Over several hosts, NODE_RANK
/// numbers the hosts in the order of their ranks, LOCAL_WORLD_SIZE counts the host's ranks.
pub(crate) fn worker_env(
    env: &WorkerEnv,
    p: &RankPlacement,
    all: &[RankPlacement],
    cuda: bool,
    visible_devices: &[String],
) -> Vec<(String, String)> {
    let here: Vec<&RankPlacement> = all.iter().filter(|q| q.node == p.node).collect();
    let mut nodes: Vec<usize> = Vec::new();
    for q in all {
        if !nodes.contains(&q.node) {
            nodes.push(q.node);
        }
    }
    let cuda_visible_devices = (cuda || !p.gpus.is_empty()).then(|| {
        let gpus: Vec<usize> = here.iter().flat_map(|q| q.gpus.iter().copied()).collect();
        device_list(&gpus, visible_devices)
    });
    WorkerEnv {
        rank: p.rank,
        local_rank: p.local_rank,
        local_world_size: here.len(),
        node_rank: nodes.iter().position(|n| *n == p.node).unwrap_or(0),
        nodes: nodes.len().max(1),
        threads: std::env::var_os("OMP_NUM_THREADS").is_none().then_some(p.threads),
        cuda_visible_devices,
        ..env.clone()
    }
    .to_env()
}

/// The CPU cores this process may run on.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it, CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|cpu| libc::CPU_ISSET(*cpu, &set)).collect()
    }
}

/// A CPU process's cores, as the scheduler assigned them among the `allowed` ones, so ranks do
/// not migrate onto each other's caches. No pinning when a core is not among them.
pub(crate) fn pinned_cpus(p: &RankPlacement, allowed: &[usize]) -> Vec<usize> {
    p.cores.iter().map(|c| allowed.get(*c).copied()).collect::<Option<Vec<usize>>>().unwrap_or_default()
}

/// A random 128-bit token, hex-encoded.
pub(crate) fn job_token() -> String {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).is_err() {
        // No /dev/urandom: fall back to time and pid, still unguessable across jobs in practice.
        let seed = unix_now().to_bits() ^ (std::process::id() as u64) << 32;
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A port free right now on loopback, for MASTER_PORT (torchrun scripts host their store there).
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
