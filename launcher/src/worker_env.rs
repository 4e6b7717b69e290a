//! What a worker process gets from the launcher: the torchrun environment plus rtrain's own
//! variables, its CPU cores, and the job's token and rendezvous port.

use crate::contract::{WorkerEnv, unix_now};
use crate::scheduler::{RankPlacement, device_list};

/// The environment of rank `p` of a role placed as `all`: the role's `env` (what every process of
/// the role's attempt is told) with the rank's own numbers, threads and devices. OMP_NUM_THREADS
/// follows the cores it was given, unless the launcher's own environment sets it.
/// `visible_devices` are the GPUs of `p`'s host, which placement indices refer to; `cuda` gives
/// the process CUDA_VISIBLE_DEVICES even without GPUs of its own. A gang rank sees the GPUs of
/// its role's ranks on its host, which LOCAL_RANK indexes (as under torchrun); with `own_gpus`
/// (the processes of other roles, as Ray's actors) a process sees only its own, so its first GPU
/// is device 0, also when it shares it with another role. Over several hosts, NODE_RANK numbers
/// the hosts in the order of their ranks, LOCAL_WORLD_SIZE counts the host's ranks.
pub(crate) fn worker_env(
    env: &WorkerEnv,
    p: &RankPlacement,
    all: &[RankPlacement],
    cuda: bool,
    own_gpus: bool,
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
        let gpus: Vec<usize> =
            if own_gpus { p.gpus.clone() } else { here.iter().flat_map(|q| q.gpus.clone()).collect() };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: usize, gpus: Vec<usize>) -> RankPlacement {
        RankPlacement { rank, local_rank: rank, threads: 1, cores: vec![rank], gpus, node: 0 }
    }

    fn visible(env: &[(String, String)]) -> Option<&str> {
        env.iter().find(|(k, _)| k == "CUDA_VISIBLE_DEVICES").map(|(_, v)| v.as_str())
    }

    #[test]
    fn gang_ranks_see_their_hosts_gpus_and_other_roles_only_their_own() {
        let devices: Vec<String> = ["4", "5", "6", "7"].map(String::from).to_vec();
        let env = WorkerEnv {
            rank: 0,
            local_rank: 0,
            world_size: 2,
            local_world_size: 2,
            node_rank: 0,
            role: "r".into(),
            attempt: 0,
            max_restarts: 0,
            run_id: "run".into(),
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            coordinator: "127.0.0.1:2".into(),
            http: None,
            token: "t".into(),
            config: "job.toml".into(),
            run_dir: None,
            global_batch: None,
            resume_from: None,
            threads: None,
            cuda_visible_devices: None,
            tls_ca: None,
            nodes: 1,
            bind_host: None,
        };
        let gang = [rank(0, vec![0]), rank(1, vec![1])];
        let e = worker_env(&env, &gang[1], &gang, true, false, &devices);
        assert_eq!(visible(&e), Some("4,5"));
        // Actors with a GPU each, and actors colocated on one GPU: each sees its own as device 0.
        let actors = [rank(0, vec![2]), rank(1, vec![3])];
        assert_eq!(visible(&worker_env(&env, &actors[1], &actors, true, true, &devices)), Some("7"));
        let colocated = [rank(0, vec![0]), rank(1, vec![0])];
        assert_eq!(visible(&worker_env(&env, &colocated[1], &colocated, true, true, &devices)), Some("4"));
        // On CPU nothing is set for a process without GPUs.
        let cpu = [rank(0, vec![])];
        assert_eq!(visible(&worker_env(&env, &cpu[0], &cpu, false, false, &devices)), None);
    }
}
