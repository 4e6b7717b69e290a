//! The environment the launcher gives each worker (the torchrun contract plus rtrain's own).

use std::path::PathBuf;

/// Names of the variables rtrain sets besides torchrun's.
pub mod vars {
    pub const COORDINATOR: &str = "RTRAIN_COORDINATOR";
    /// The coordinator's HTTP/JSON endpoint (`host:port`): the address book, metrics, events.
    pub const HTTP: &str = "RTRAIN_HTTP";
    pub const JOB_TOKEN: &str = "RTRAIN_JOB_TOKEN";
    pub const ROLE: &str = "RTRAIN_ROLE";
    pub const ATTEMPT: &str = "RTRAIN_ATTEMPT";
    /// The effective config of the run (`<run>/config.toml`).
    pub const CONFIG: &str = "RTRAIN_CONFIG";
    /// The run directory (checkpoints are written under it).
    pub const RUN_DIR: &str = "RTRAIN_RUN_DIR";
    /// Sequences per optimizer step to keep, whatever the gang size of this attempt.
    pub const GLOBAL_BATCH: &str = "RTRAIN_GLOBAL_BATCH";
    /// A verified checkpoint directory to resume from; unset for a fresh start.
    pub const RESUME_FROM: &str = "RTRAIN_RESUME_FROM";
    /// The certificate (PEM) of the CA that issued the coordinator's: set when the job spans
    /// several hosts, whose control plane is TLS.
    pub const TLS_CA: &str = "RTRAIN_TLS_CA";
    /// Hosts of the training gang's attempt (set when more than one).
    pub const NODES: &str = "RTRAIN_NODES";
    /// The address this host's processes listen on for their peers.
    pub const BIND_HOST: &str = "RTRAIN_BIND_HOST";
}

/// Whether rtrain sets the variable `name` for its workers itself (so `job.env` may not).
pub fn is_reserved(name: &str) -> bool {
    const TORCHRUN: [&str; 11] = [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "NODE_RANK",
        "ROLE_NAME",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ];
    TORCHRUN.contains(&name)
        || name.starts_with("RTRAIN_")
        || name.starts_with("TORCHELASTIC_")
        || name == "OMP_NUM_THREADS"
        || name == "CUDA_VISIBLE_DEVICES"
}

/// Why a process is not a correctly started rtrain worker.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message} (workers are started by `rtrain launch`, which sets it)")]
pub struct EnvError {
    pub var: &'static str,
    pub message: String,
}

/// What a process of the job is told through its environment: who it is (torchrun's variables,
/// so a torchrun script runs unchanged, plus its role and attempt), how to reach the coordinator,
/// and the run it belongs to. The launcher writes it with [`WorkerEnv::to_env`]; a process reads
/// it with [`WorkerEnv::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Rank and size within the role (every role is its own world).
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub role: String,
    /// The role's attempt, or the incarnation of a process that restarts alone.
    pub attempt: u32,
    pub max_restarts: u32,
    pub run_id: String,
    pub master_addr: String,
    pub master_port: u16,
    pub coordinator: String,
    /// The coordinator's HTTP/JSON endpoint.
    pub http: Option<String>,
    pub token: String,
    pub config: PathBuf,
    pub run_dir: Option<PathBuf>,
    pub global_batch: Option<usize>,
    pub resume_from: Option<PathBuf>,
    /// OMP_NUM_THREADS, when the launcher sets it.
    pub threads: Option<usize>,
    /// CUDA_VISIBLE_DEVICES, when the process has GPUs.
    pub cuda_visible_devices: Option<String>,
    /// The job CA's certificate, when the control plane is TLS.
    pub tls_ca: Option<String>,
    /// Hosts of the role's attempt.
    pub nodes: usize,
    /// The address this process's host listens on for peers; loopback when unset.
    pub bind_host: Option<String>,
}

impl WorkerEnv {
    /// True when this process was started by the launcher as a worker.
    pub fn is_worker_process() -> bool {
        std::env::var_os(vars::JOB_TOKEN).is_some() && std::env::var_os(vars::ROLE).is_some()
    }

    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// The variables, as [`WorkerEnv::from_env`] reads them back.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(&str, String)> = vec![
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("GROUP_RANK", self.node_rank.to_string()),
            ("NODE_RANK", self.node_rank.to_string()),
            ("ROLE_NAME", self.role.clone()),
            ("ROLE_RANK", self.rank.to_string()),
            ("ROLE_WORLD_SIZE", self.world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("TORCHELASTIC_RESTART_COUNT", self.attempt.to_string()),
            ("TORCHELASTIC_MAX_RESTARTS", self.max_restarts.to_string()),
            ("TORCHELASTIC_RUN_ID", self.run_id.clone()),
            (vars::COORDINATOR, self.coordinator.clone()),
            (vars::JOB_TOKEN, self.token.clone()),
            (vars::ROLE, self.role.clone()),
            (vars::ATTEMPT, self.attempt.to_string()),
            (vars::CONFIG, self.config.display().to_string()),
        ];
        let optional = [
            (vars::HTTP, self.http.clone()),
            (vars::RUN_DIR, self.run_dir.as_ref().map(|p| p.display().to_string())),
            (vars::GLOBAL_BATCH, self.global_batch.map(|b| b.to_string())),
            (vars::RESUME_FROM, self.resume_from.as_ref().map(|p| p.display().to_string())),
            ("OMP_NUM_THREADS", self.threads.map(|t| t.to_string())),
            ("CUDA_VISIBLE_DEVICES", self.cuda_visible_devices.clone()),
            (vars::TLS_CA, self.tls_ca.clone()),
            (vars::NODES, (self.nodes > 1).then(|| self.nodes.to_string())),
            (vars::BIND_HOST, self.bind_host.clone()),
        ];
        env.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// Reads the variables through `get`, so tests need not touch the process environment.
    /// torchrun's optional variables default as torchrun would have set them for one node.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let text = |var: &'static str| get(var).ok_or_else(|| EnvError { var, message: "is not set".into() });
        let parse = |var: &'static str, raw: String| -> Result<u64, EnvError> {
            raw.parse().map_err(|_| EnvError { var, message: format!("`{raw}` is not a number") })
        };
        let number = |var: &'static str| parse(var, text(var)?);
        let optional = |var: &'static str| get(var).filter(|v| !v.is_empty()).map(|raw| parse(var, raw)).transpose();
        let world_size = number("WORLD_SIZE")? as usize;
        let env = WorkerEnv {
            rank: number("RANK")? as usize,
            local_rank: number("LOCAL_RANK")? as usize,
            world_size,
            local_world_size: optional("LOCAL_WORLD_SIZE")?.map_or(world_size, |n| n as usize),
            node_rank: optional("NODE_RANK")?.unwrap_or(0) as usize,
            role: text(vars::ROLE)?,
            attempt: u32::try_from(number(vars::ATTEMPT)?)
                .map_err(|_| EnvError { var: vars::ATTEMPT, message: "is too large".into() })?,
            max_restarts: optional("TORCHELASTIC_MAX_RESTARTS")?.unwrap_or(0).min(u32::MAX as u64) as u32,
            run_id: get("TORCHELASTIC_RUN_ID").unwrap_or_default(),
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: u16::try_from(optional("MASTER_PORT")?.unwrap_or(0))
                .map_err(|_| EnvError { var: "MASTER_PORT", message: "is not a port".into() })?,
            coordinator: text(vars::COORDINATOR)?,
            http: get(vars::HTTP).filter(|v| !v.is_empty()),
            token: text(vars::JOB_TOKEN)?,
            config: PathBuf::from(text(vars::CONFIG)?),
            run_dir: get(vars::RUN_DIR).filter(|p| !p.is_empty()).map(PathBuf::from),
            global_batch: optional(vars::GLOBAL_BATCH)?.map(|b| b as usize),
            resume_from: get(vars::RESUME_FROM).filter(|p| !p.is_empty()).map(PathBuf::from),
            threads: optional("OMP_NUM_THREADS")?.map(|t| t as usize),
            cuda_visible_devices: get("CUDA_VISIBLE_DEVICES"),
            tls_ca: get(vars::TLS_CA).filter(|v| !v.is_empty()),
            nodes: optional(vars::NODES)?.map_or(1, |n| n.max(1) as usize),
            bind_host: get(vars::BIND_HOST).filter(|v| !v.is_empty()),
        };
        if env.rank >= env.world_size {
            return Err(EnvError {
                var: "RANK",
                message: format!("{} is not below WORLD_SIZE {}", env.rank, env.world_size),
            });
        }
        Ok(env)
    }
}

/// Seconds since the Unix epoch, as a float.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkerEnv {
        WorkerEnv {
            rank: 1,
            local_rank: 1,
            world_size: 2,
            local_world_size: 2,
            node_rank: 0,
            role: "actor".into(),
            attempt: 3,
            max_restarts: 10,
            run_id: "demo".into(),
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            coordinator: "127.0.0.1:4000".into(),
            http: Some("127.0.0.1:4001".into()),
            token: "t0k".into(),
            config: "/runs/demo/config.toml".into(),
            run_dir: Some("/runs/demo".into()),
            global_batch: Some(64),
            resume_from: Some("/runs/demo/checkpoints/step-000020".into()),
            threads: Some(4),
            cuda_visible_devices: Some("2,3".into()),
            tls_ca: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
            nodes: 2,
            bind_host: Some("10.0.0.2".into()),
        }
    }

    fn lookup(vars: Vec<(String, String)>) -> impl Fn(&str) -> Option<String> {
        move |k| vars.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_environment_round_trips() {
        let env = sample();
        assert_eq!(WorkerEnv::from_lookup(lookup(env.to_env())).unwrap(), env);
        let bare = WorkerEnv {
            http: None,
            run_dir: None,
            global_batch: None,
            resume_from: None,
            threads: None,
            cuda_visible_devices: None,
            tls_ca: None,
            nodes: 1,
            bind_host: None,
            ..sample()
        };
        let vars = bare.to_env();
        assert!(!vars.iter().any(|(k, _)| k == "OMP_NUM_THREADS" || k == vars::RESUME_FROM));
        assert_eq!(WorkerEnv::from_lookup(lookup(vars)).unwrap(), bare);
    }

    #[test]
    fn torchrun_names_are_set_for_scripts() {
        let vars = sample().to_env();
        let get = lookup(vars);
        for (k, v) in
            [("ROLE_NAME", "actor"), ("ROLE_RANK", "1"), ("TORCHELASTIC_RESTART_COUNT", "3"), ("GROUP_RANK", "0")]
        {
            assert_eq!(get(k).as_deref(), Some(v), "{k}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let mut vars = sample().to_env();
        vars.retain(|(k, _)| k != vars::JOB_TOKEN);
        let e = WorkerEnv::from_lookup(lookup(vars)).unwrap_err();
        assert_eq!(e.var, vars::JOB_TOKEN);
        let mut vars = sample().to_env();
        vars.iter_mut().filter(|(k, _)| k == "RANK").for_each(|(_, v)| *v = "7".into());
        assert_eq!(WorkerEnv::from_lookup(lookup(vars)).unwrap_err().var, "RANK");
        let mut vars = sample().to_env();
        vars.iter_mut().filter(|(k, _)| k == "MASTER_PORT").for_each(|(_, v)| *v = "70000".into());
        assert_eq!(WorkerEnv::from_lookup(lookup(vars)).unwrap_err().var, "MASTER_PORT");
    }
}
