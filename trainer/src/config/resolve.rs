//! The strict job description the code uses, computed once from a [`JobConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ConfigError, JobConfig};

/// Warm-up length when the config names none (shortened to train.steps for shorter runs).
const DEFAULT_WARMUP_STEPS: u64 = 10;

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// The trainer gang's collective backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Tcp,
    Nccl,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Tcp => "tcp",
            BackendKind::Nccl => "nccl",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    Synthetic { bytes: usize },
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimSpec {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// 0 disables clipping.
    pub grad_clip: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub n_layer: i64,
    pub n_head: i64,
    pub n_embd: i64,
    pub n_ctx: i64,
    pub vocab_size: i64,
}

/// A validated job with every derived number computed.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    /// `<run_dir>/<name>`: metrics, summary, logs and checkpoints.
    pub run_path: PathBuf,
    pub seed: u64,
    /// The worker command; `None` runs the built-in worker.
    pub entrypoint: Option<Vec<String>>,
    pub workers: usize,
    pub steps: u64,
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// Sequences per optimizer step over all workers: workers × micro_batch × grad_accum.
    pub global_batch: usize,
    /// Tokens per optimizer step over all workers: global_batch × n_ctx.
    pub tokens_per_step: usize,
    pub optim: OptimSpec,
    pub device: DeviceKind,
    pub backend: BackendKind,
    pub cpus_per_worker: usize,
    pub collective_timeout: Duration,
    pub bucket_bytes: usize,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub rendezvous_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub user: toml::Table,
}

/// Checks `cfg` (read from `path`) and derives the job's numbers.
pub fn resolve(cfg: &JobConfig, path: &Path) -> Result<JobSpec, ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let positive = |key: &str, v: u64| {
        if v == 0 { Err(bad(key, "must be at least 1".into())) } else { Ok(v) }
    };
    let positive_f = |key: &str, v: f64| {
        if v.is_finite() && v > 0.0 { Ok(v) } else { Err(bad(key, format!("must be a positive number, got {v}"))) }
    };
    let (job, train, model, data) = (&cfg.job, &cfg.train, &cfg.model, &cfg.data);

    let name_ok = !job.name.is_empty()
        && job.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !job.name.starts_with('.');
    if !name_ok {
        return Err(bad("job.name", format!("`{}` must be a non-empty name of letters, digits, `-`, `_` or `.`", job.name)));
    }
    if job.run_dir.is_empty() {
        return Err(bad("job.run_dir", "must name a directory".into()));
    }
    let entrypoint = if job.entrypoint.is_empty() { None } else { Some(job.entrypoint.clone()) };
    if entrypoint.as_ref().is_some_and(|e| e[0].is_empty()) {
        return Err(bad("job.entrypoint", "the program name is empty".into()));
    }

    let workers = positive("train.workers", train.workers)? as usize;
    let steps = positive("train.steps", train.steps)?;
    let micro_batch = positive("train.micro_batch", train.micro_batch)? as usize;
    let grad_accum = positive("train.grad_accum", train.grad_accum)? as usize;
    let lr = positive_f("train.lr", train.lr)?;
    let min_lr = train.min_lr.unwrap_or(lr / 10.0);
    if !(min_lr.is_finite() && (0.0..=lr).contains(&min_lr)) {
        return Err(bad("train.min_lr", format!("must be between 0 and train.lr ({lr}), got {min_lr}")));
    }
    // A warm-up longer than the run is allowed (a short trial run of a long config); the
    // schedule then never reaches its decay phase.
    let warmup_steps = train.warmup_steps.unwrap_or(DEFAULT_WARMUP_STEPS.min(steps));
    for (key, v) in [("train.beta1", train.beta1), ("train.beta2", train.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(bad(key, format!("must be in [0, 1), got {v}")));
        }
    }
    for (key, v) in [("train.weight_decay", train.weight_decay), ("train.grad_clip", train.grad_clip)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(bad(key, format!("must be zero or positive, got {v}")));
        }
    }
    let device = match train.device.as_str() {
        "cpu" => DeviceKind::Cpu,
        "cuda" => DeviceKind::Cuda,
        other => return Err(bad("train.device", format!("`{other}` is not a device; use \"cpu\" or \"cuda\""))),
    };
    let backend = match (train.backend.as_str(), device) {
        ("auto", DeviceKind::Cpu) | ("tcp", DeviceKind::Cpu) => BackendKind::Tcp,
        ("auto", DeviceKind::Cuda) | ("nccl", DeviceKind::Cuda) => BackendKind::Nccl,
        ("tcp", DeviceKind::Cuda) => {
            return Err(bad("train.backend", "tcp reduces CPU tensors; use \"nccl\" (or \"auto\") with device \"cuda\"".into()));
        }
        ("nccl", DeviceKind::Cpu) => {
            return Err(bad("train.backend", "nccl needs CUDA tensors; use \"tcp\" (or \"auto\") with device \"cpu\"".into()));
        }
        (other, _) => return Err(bad("train.backend", format!("`{other}` is not a backend; use \"auto\", \"tcp\" or \"nccl\""))),
    };
    let cpus_per_worker = positive("train.cpus_per_worker", train.cpus_per_worker)? as usize;
    let collective_timeout = Duration::from_secs_f64(positive_f("train.collective_timeout_s", train.collective_timeout_s)?);
    let bucket_bytes = (positive_f("train.bucket_mb", train.bucket_mb)? * (1 << 20) as f64) as usize;

    if model.kind != "gpt" {
        return Err(bad("model.kind", format!("`{}` is not a built-in model; the built-in trainer supports \"gpt\"", model.kind)));
    }
    for (key, v) in [
        ("model.n_layer", model.n_layer),
        ("model.n_head", model.n_head),
        ("model.n_embd", model.n_embd),
        ("model.n_ctx", model.n_ctx),
        ("model.vocab_size", model.vocab_size),
    ] {
        if v < 1 {
            return Err(bad(key, format!("must be at least 1, got {v}")));
        }
    }
    if model.n_embd % model.n_head != 0 {
        return Err(bad("model.n_embd", format!("must be a multiple of model.n_head ({}), got {}", model.n_head, model.n_embd)));
    }
    if model.vocab_size > 256 {
        return Err(bad("model.vocab_size", format!("the byte-level trainer needs at most 256, got {}", model.vocab_size)));
    }
    let data_spec = match data.source.as_str() {
        "" => return Err(bad("data.source", "use \"synthetic\" or a path to a text file".into())),
        "synthetic" => {
            let needed = model.n_ctx as u64 + 2;
            if data.synthetic_bytes < needed {
                return Err(bad("data.synthetic_bytes", format!("must be at least n_ctx + 2 = {needed}")));
            }
            DataSpec::Synthetic { bytes: data.synthetic_bytes as usize }
        }
        file => DataSpec::File(PathBuf::from(file)),
    };

    let rendezvous = &cfg.rendezvous;
    let rendezvous_timeout = Duration::from_secs_f64(positive_f("rendezvous.timeout_s", rendezvous.timeout_s)?);
    let heartbeat_interval = Duration::from_secs_f64(positive_f("rendezvous.heartbeat_s", rendezvous.heartbeat_s)?);

    let global_batch = workers * micro_batch * grad_accum;
    Ok(JobSpec {
        name: job.name.clone(),
        run_path: Path::new(&job.run_dir).join(&job.name),
        seed: job.seed,
        entrypoint,
        workers,
        steps,
        micro_batch,
        grad_accum,
        global_batch,
        tokens_per_step: global_batch * model.n_ctx as usize,
        optim: OptimSpec {
            lr,
            min_lr,
            warmup_steps,
            weight_decay: train.weight_decay,
            beta1: train.beta1,
            beta2: train.beta2,
            grad_clip: train.grad_clip,
        },
        device,
        backend,
        cpus_per_worker,
        collective_timeout,
        bucket_bytes,
        model: ModelSpec {
            n_layer: model.n_layer,
            n_head: model.n_head,
            n_embd: model.n_embd,
            n_ctx: model.n_ctx,
            vocab_size: model.vocab_size,
        },
        data: data_spec,
        rendezvous_timeout,
        heartbeat_interval,
        user: cfg.user.clone(),
    })
}
