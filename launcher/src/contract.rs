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
}

/// Why a process is not a correctly started rtrain worker.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message} (workers are started by `rtrain launch`, which sets it)")]
pub struct EnvError {
    pub var: &'static str,
    pub message: String,
}

/// This worker's identity and where to reach the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub role: String,
    pub attempt: u32,
    pub coordinator: String,
    pub token: String,
    pub config: PathBuf,
    pub run_dir: Option<PathBuf>,
    pub global_batch: Option<usize>,
    pub resume_from: Option<PathBuf>,
}

impl WorkerEnv {
    /// True when this process was started by the launcher as a worker.
    pub fn is_worker_process() -> bool {
        std::env::var_os(vars::JOB_TOKEN).is_some() && std::env::var_os(vars::ROLE).is_some()
    }

    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get`, so tests need not touch the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let text = |var: &'static str| get(var).ok_or_else(|| EnvError { var, message: "is not set".into() });
        let number = |var: &'static str| -> Result<u64, EnvError> {
            let raw = text(var)?;
            raw.parse().map_err(|_| EnvError { var, message: format!("`{raw}` is not a number") })
        };
        let env = WorkerEnv {
            rank: number("RANK")? as usize,
            local_rank: number("LOCAL_RANK")? as usize,
            world_size: number("WORLD_SIZE")? as usize,
            role: text(vars::ROLE)?,
            attempt: number(vars::ATTEMPT)? as u32,
            coordinator: text(vars::COORDINATOR)?,
            token: text(vars::JOB_TOKEN)?,
            config: PathBuf::from(text(vars::CONFIG)?),
            run_dir: get(vars::RUN_DIR).map(PathBuf::from),
            global_batch: match get(vars::GLOBAL_BATCH) {
                Some(_) => Some(number(vars::GLOBAL_BATCH)? as usize),
                None => None,
            },
            resume_from: get(vars::RESUME_FROM).filter(|p| !p.is_empty()).map(PathBuf::from),
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
