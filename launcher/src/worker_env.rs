//! What a worker process gets from the launcher: the torchrun environment plus rtrain's own
//! variables, its CPU cores, and the job's token and rendezvous port.

use std::path::PathBuf;

use crate::config::DeviceKind;
use crate::contract::{WorkerEnv, unix_now};
use crate::scheduler::{RankPlacement, device_list};

/// What every process of one role's attempt is told.
pub(crate) struct WorkerCommon {
    pub(crate) coordinator: String,
    /// The coordinator's HTTP/JSON endpoint, for programs in any language.
    pub(crate) http: String,
    pub(crate) token: String,
    pub(crate) config: PathBuf,
    pub(crate) run_dir: PathBuf,
    pub(crate) run_id: String,
    pub(crate) role: String,
    pub(crate) master_port: u16,
    /// The role's attempt, or the incarnation of a process that restarts alone.
    pub(crate) attempt: u32,
    pub(crate) max_restarts: u32,
    pub(crate) world_size: usize,
    /// Sequences per optimizer step (the training role only).
    pub(crate) global_batch: Option<usize>,
    pub(crate) resume: Option<PathBuf>,
    pub(crate) device: DeviceKind,
    /// The launcher's visible GPUs, which placement indices refer to.
    pub(crate) visible_devices: Vec<String>,
}

/// The environment of one process: [`WorkerEnv`] for rank `p` of the role placed as `all`.
/// OMP_NUM_THREADS follows the cores it was given, unless the launcher's own environment sets it.
pub(crate) fn worker_env(c: &WorkerCommon, p: &RankPlacement, all: &[RankPlacement]) -> Vec<(String, String)> {
    let cuda_visible_devices = (c.device == DeviceKind::Cuda || !p.gpus.is_empty()).then(|| {
        let gpus: Vec<usize> = all.iter().flat_map(|q| q.gpus.iter().copied()).collect();
        device_list(&gpus, &c.visible_devices)
    });
    WorkerEnv {
        rank: p.rank,
        local_rank: p.local_rank,
        world_size: c.world_size,
        local_world_size: all.len(),
        node_rank: 0,
        role: c.role.clone(),
        attempt: c.attempt,
        max_restarts: c.max_restarts,
        run_id: c.run_id.clone(),
        master_addr: "127.0.0.1".into(),
        master_port: c.master_port,
        coordinator: c.coordinator.clone(),
        http: Some(c.http.clone()),
        token: c.token.clone(),
        config: c.config.clone(),
        run_dir: Some(c.run_dir.clone()),
        global_batch: c.global_batch,
        resume_from: c.resume.clone(),
        threads: std::env::var_os("OMP_NUM_THREADS").is_none().then_some(p.threads),
        cuda_visible_devices,
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
