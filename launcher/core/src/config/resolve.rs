//! The strict job description the code uses, computed once from a [`JobConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::choice::choice;
use super::preference::{PreferenceSpec, resolve_objective};
use super::rl::{ROLLOUT_ROLE, RlAlgorithm, RlSpec, resolve_rl};
use super::schema::{BackendChoice, EchoChoice, MetricChoice, ModelInit, ModelKind, OrderChoice, TrainerChoice};
use super::{ConfigError, JobConfig, RestartMode, Workers};
use crate::checkpoint::MetricOrder;

/// Warm-up length when the config names none (shortened to train.steps for shorter runs).
const DEFAULT_WARMUP_STEPS: u64 = 10;
/// The longest duration any setting takes: a week. Longer ones would overflow the clock
/// arithmetic of timers and deadlines.
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;
/// The most restarts a budget may allow.
const MAX_RESTARTS: u64 = 1_000_000;

/// A duration setting in seconds: finite, at most [`MAX_SECONDS`], above zero unless `zero_ok`.
pub(super) fn seconds(key: &str, v: f64, zero_ok: bool) -> Result<Duration, (String, String)> {
    let low_ok = if zero_ok { v >= 0.0 } else { v > 0.0 };
    if v.is_finite() && low_ok && v <= MAX_SECONDS {
        Ok(Duration::from_secs_f64(v))
    } else {
        let low = if zero_ok { "from 0" } else { "above 0" };
        Err((key.to_string(), format!("must be a number of seconds {low} up to {MAX_SECONDS} (a week), got {v}")))
    }
}

/// A restart budget: at most [`MAX_RESTARTS`].
fn restarts(key: &str, v: u64) -> Result<u32, (String, String)> {
    if v <= MAX_RESTARTS {
        Ok(v as u32)
    } else {
        Err((key.to_string(), format!("must be at most {MAX_RESTARTS}, got {v}")))
    }
}

choice!(
    /// Where tensors live (`train.device`).
    DeviceKind, "a device", { Cpu = "cpu", Cuda = "cuda" }
);
choice!(
    /// The forward pass's arithmetic (`train.precision`): float32, or bf16 autocast over float32
    /// weights, gradients and optimizer state.
    Precision, "a precision", { Fp32 = "fp32", Bf16 = "bf16" }
);

/// The trainer gang's collective backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Tcp,
    /// Shared memory between ranks on one host (CPU tensors). With `or_tcp` (backend `auto`),
    /// ranks that cannot set it up (not one host, `/dev/shm` too small) use `tcp` and log why.
    Shm {
        or_tcp: bool,
    },
    Nccl,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Tcp => "tcp",
            BackendKind::Shm { .. } => "shm",
            BackendKind::Nccl => "nccl",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    Synthetic { bytes: usize },
    File(PathBuf),
}

/// Which built-in training loop runs (when the job has no entrypoint of its own).
#[derive(Debug, Clone, PartialEq)]
pub enum TrainerKind {
    /// The byte-level GPT, from scratch.
    Lm,
    /// Supervised fine-tuning of a Hugging Face model folder on JSONL examples; with
    /// `random_init` the folder's architecture and tokenizer start from random weights.
    Sft { model: PathBuf, max_len: usize, random_init: bool },
    /// RL post-training of a Hugging Face model folder on JSONL prompts, fed by rollout actors.
    Rl { model: PathBuf, max_len: usize, rl: Box<RlSpec> },
    /// Reward-model training or DPO of a Hugging Face model folder on JSONL preference pairs.
    Preference(Box<PreferenceSpec>),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Where the job's processes run (`job.working_dir`, made absolute by `load`).
    pub working_dir: PathBuf,
    pub seed: u64,
    /// The worker command; `None` runs the built-in worker.
    pub entrypoint: Option<Vec<String>>,
    /// `job.env`: set for every process of the job.
    pub env: Vec<(String, String)>,
    pub echo: EchoChoice,
    pub trainer: TrainerKind,
    /// Gang size: the fixed size, or the largest of an elastic gang.
    pub workers: usize,
    /// Smallest gang an elastic job runs with (equal to `workers` for a fixed gang).
    pub min_workers: usize,
    pub steps: u64,
    pub micro_batch: usize,
    /// Micro-batches per optimizer step on each rank (recomputed by [`JobSpec::with_world`]).
    pub grad_accum: usize,
    /// Sequences per optimizer step over all workers: workers × micro_batch × grad_accum, kept
    /// whatever the size of the gang that runs it.
    pub global_batch: usize,
    /// Tokens per optimizer step over all workers: global_batch × n_ctx.
    pub tokens_per_step: usize,
    pub optim: OptimSpec,
    pub device: DeviceKind,
    pub backend: BackendKind,
    pub cpus_per_worker: f64,
    pub collective_timeout: Duration,
    pub bucket_bytes: usize,
    /// The forward pass's arithmetic; weights, gradients and optimizer state are float32 either way.
    pub precision: Precision,
    /// Float32 matmuls and convolutions on CUDA may use TF32 tensor cores.
    pub tf32: bool,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub rendezvous_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub checkpoint: CheckpointSpec,
    /// Held-out evaluation (`[eval]`), for `lm` and `sft`.
    pub eval: Option<EvalSpec>,
    pub fault: FaultSpec,
    pub user: toml::Table,
    /// Every role of the job, the training role (if any) first.
    pub roles: Vec<RoleSpec>,
    /// The hosts the job runs on (`[cluster]`).
    pub cluster: ClusterSpec,
}

/// `[cluster]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Hosts, counting the driver's.
    pub hosts: usize,
    /// Where the coordinator listens (loopback and a free port for one host).
    pub bind: std::net::SocketAddr,
    /// Where the job token is kept (required beyond one host: agents read it).
    pub token_file: Option<PathBuf>,
    /// The user's own TLS files; `None`: a CA made for each launch.
    pub tls: Option<TlsFiles>,
    /// The most megabytes of the working directory shipped to the other hosts.
    pub max_working_dir_mb: u64,
}

/// The coordinator's certificate and key, and the CA that issued the certificate (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ClusterSpec {
    pub fn multi_host(&self) -> bool {
        self.hosts > 1
    }
}

/// At most this many hosts in one job.
pub const MAX_HOSTS: u64 = 1024;

fn resolve_cluster(c: &super::ClusterSection) -> Result<ClusterSpec, (String, String)> {
    let bad = |key: &str, message: String| (format!("cluster.{key}"), message);
    if !(1..=MAX_HOSTS).contains(&c.hosts) {
        return Err(bad("hosts", format!("must be between 1 and {MAX_HOSTS}, got {}", c.hosts)));
    }
    let bind = match c.bind.as_str() {
        "" if c.hosts > 1 => {
            return Err(bad(
                "bind",
                format!(
                    "cluster.hosts = {} needs the address the other hosts reach this one at, e.g. \"10.0.0.1:29400\"",
                    c.hosts
                ),
            ));
        }
        "" => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        text => text.parse().map_err(|_| {
            bad("bind", format!("`{text}` is not ADDRESS:PORT (an IP address and a port, e.g. \"10.0.0.1:29400\")"))
        })?,
    };
    if c.hosts > 1 && bind.ip().is_unspecified() {
        return Err(bad(
            "bind",
            format!(
                "{bind} is not an address the other hosts can reach: give this host's own address (the coordinator \
                 tells every process to connect there)"
            ),
        ));
    }
    if c.max_working_dir_mb == 0 {
        return Err(bad("max_working_dir_mb", "must be at least 1 (megabyte)".into()));
    }
    if c.hosts > 1 && c.token_file.is_empty() {
        return Err(bad(
            "token_file",
            "a job over several hosts keeps its token in a file the agents read (e.g. \"job.token\"; written with mode 0600 if missing)"
                .into(),
        ));
    }
    let token_file = (!c.token_file.is_empty()).then(|| PathBuf::from(&c.token_file));
    let tls = match (c.tls_cert.as_str(), c.tls_key.as_str(), c.tls_ca.as_str()) {
        ("", "", "") => None,
        (cert, key, ca) if !cert.is_empty() && !key.is_empty() && !ca.is_empty() => {
            Some(TlsFiles { cert: cert.into(), key: key.into(), ca: ca.into() })
        }
        _ => {
            let missing = [("tls_cert", &c.tls_cert), ("tls_key", &c.tls_key), ("tls_ca", &c.tls_ca)]
                .into_iter()
                .find(|(_, v)| v.is_empty())
                .map_or("tls_ca", |(k, _)| k);
            return Err(bad(
                missing,
                "cluster.tls_cert, tls_key and tls_ca go together: set all three, or none".into(),
            ));
        }
    };
    Ok(ClusterSpec { hosts: c.hosts as usize, bind, token_file, tls, max_working_dir_mb: c.max_working_dir_mb })
}

/// The name of the role `[train]` describes.
pub const TRAINING_ROLE: &str = "trainer";

/// One role of the job: its processes, what they run, their resources and restart policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleSpec {
    pub name: String,
    /// Processes to start (the largest size of an elastic role).
    pub size: usize,
    /// Fewest processes the role runs with.
    pub min_size: usize,
    pub program: RoleProgram,
    pub restart: RestartMode,
    pub cpus_per_worker: f64,
    pub gpus_per_worker: usize,
    /// The role's processes run on the training role's GPUs (process i beside training rank i
    /// mod its size on the driver's host) and take none of their own.
    pub on_training_gpus: bool,
    /// Restarts the role may use; the training role counts against `fault` instead.
    pub max_restarts: u32,
    /// Delay before restarting a process, doubled per failure in a row.
    pub backoff: Duration,
    /// The training role: the job ends when it finishes.
    pub training: bool,
}

/// Built-in programs a role may run instead of a command (`program = "NAME"`).
pub const BUILTIN_PROGRAMS: &[&str] = &[ROLLOUT_ROLE];

/// What the processes of a role run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleProgram {
    /// The launch's own worker program (the built-in trainer, or the binary of a custom loop).
    Worker,
    /// A command of the user's.
    Command(Vec<String>),
    /// A program built into rtrain (`rtrain-worker role NAME`), one of [`BUILTIN_PROGRAMS`].
    BuiltIn(String),
}

impl std::fmt::Display for RoleProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoleProgram::Worker => f.write_str("the job's worker program"),
            RoleProgram::Command(cmd) => f.write_str(&cmd.join(" ")),
            RoleProgram::BuiltIn(name) => write!(f, "built-in {name}"),
        }
    }
}

impl RoleSpec {
    /// The config key of a setting of this role, for messages: `train.workers`, `roles.actor.size`.
    pub fn key(&self, setting: &str) -> String {
        match (self.training, setting) {
            (true, "size") => "train.workers".into(),
            (true, _) => format!("train.{setting}"),
            (false, _) => format!("roles.{}.{setting}", self.name),
        }
    }
}

impl JobSpec {
    /// The training role, if the job has one.
    pub fn training_role(&self) -> Option<&RoleSpec> {
        self.roles.first().filter(|r| r.training)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointSpec {
    /// Steps between saves; 0 saves only the final step.
    pub every: u64,
    pub keep_last: usize,
    pub keep_best: usize,
    /// What a checkpoint records as its metric (ranked by `keep_best`).
    pub metric: MetricChoice,
    pub order: MetricOrder,
    pub async_save: bool,
}

/// Held-out evaluation during training (`[eval]`).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    /// Steps between evaluations (also after the last step).
    pub every: u64,
    /// Global batches per evaluation.
    pub batches: usize,
    pub held_out: HeldOut,
}

impl EvalSpec {
    /// Whether the model after `completed` optimizer steps is evaluated.
    pub fn due(&self, completed: u64, total: u64) -> bool {
        completed == total || completed.is_multiple_of(self.every)
    }
}

/// Where the held-out data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum HeldOut {
    /// The last share of the training data (its bytes for `lm`, its examples for `sft`), which
    /// training then leaves out.
    Fraction(f64),
    /// A file in the training data's format.
    File(PathBuf),
}

/// Share of the data held out when `[eval]` names no split.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.05;

/// `[eval]` with `data.eval_fraction` / `data.eval_path`: for `lm` and `sft`; the preference
/// trainers read the split for their own before/after evaluation (see `resolve_objective`), and
/// RL has `rl.eval_*`.
fn resolve_eval(cfg: &JobConfig, trainer: &TrainerKind) -> Result<Option<EvalSpec>, (String, String)> {
    let (eval, data) = (&cfg.eval, &cfg.data);
    let split_key = if data.eval_path.is_empty() { "data.eval_fraction" } else { "data.eval_path" };
    let split_given = !data.eval_path.is_empty() || data.eval_fraction.is_some();
    let evaluates = matches!(trainer, TrainerKind::Lm | TrainerKind::Sft { .. });
    if !evaluates {
        if eval.every > 0 {
            let instead = match trainer {
                TrainerKind::Preference(_) => "dpo and rm score the held-out pairs before and after training",
                _ => "RL scores held-out prompts from rl.eval_path / rl.eval_fraction",
            };
            return Err(("eval.every".into(), format!("is for train.trainer = \"lm\" or \"sft\"; {instead}")));
        }
        if split_given && !matches!(trainer, TrainerKind::Preference(_)) {
            return Err((split_key.into(), "is not read by RL; use rl.eval_path / rl.eval_fraction".into()));
        }
        return Ok(None);
    }
    if eval.every == 0 {
        if split_given {
            return Err((split_key.into(), "holds data out for evaluations: set eval.every too".into()));
        }
        return Ok(None);
    }
    if eval.batches == 0 {
        return Err(("eval.batches".into(), "must be at least 1".into()));
    }
    let held_out = match (data.eval_path.as_str(), data.eval_fraction) {
        ("", None) => HeldOut::Fraction(DEFAULT_EVAL_FRACTION),
        ("", Some(f)) if f > 0.0 && f < 1.0 => HeldOut::Fraction(f),
        ("", Some(f)) => return Err(("data.eval_fraction".into(), format!("must be above 0 and below 1, got {f}"))),
        (_, Some(_)) => {
            return Err((
                "data.eval_fraction".into(),
                "set either data.eval_path or data.eval_fraction, not both".into(),
            ));
        }
        (path, None) if Path::new(path).is_file() => HeldOut::File(PathBuf::from(path)),
        (path, None) => return Err(("data.eval_path".into(), format!("{path} is not a file"))),
    };
    Ok(Some(EvalSpec { every: eval.every, batches: eval.batches as usize, held_out }))
}

impl CheckpointSpec {
    /// Whether the state after `completed` optimizer steps is saved.
    pub fn due(&self, completed: u64, total: u64) -> bool {
        completed == total || (self.every > 0 && completed.is_multiple_of(self.every))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSpec {
    pub max_restarts: u32,
    pub max_user_restarts: u32,
    pub heartbeat_timeout: Duration,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Time workers get to save and exit when the launch is stopped.
    pub stop_grace: Duration,
}

impl FaultSpec {
    /// Delay before restart number `restart` (1-based): backoff × 2^(restart - 1), capped.
    pub fn backoff_before(&self, restart: u32) -> Duration {
        let factor = 2f64.powi(restart.saturating_sub(1).min(30) as i32);
        self.backoff.mul_f64(factor).min(self.max_backoff)
    }
}

impl JobSpec {
    /// The job as a gang of `world_size` ranks runs it: the global batch kept, gradient
    /// accumulation recomputed (rounded up; the last micro-batches of some ranks then hold
    /// fewer samples, and the loss is weighted by sample count, so the step is the same).
    pub fn with_world(mut self, world_size: usize, global_batch: usize) -> Self {
        // Saturating: `global_batch` may come from a checkpoint's file.
        let per_pass = world_size.max(1).saturating_mul(self.micro_batch);
        self.grad_accum = global_batch.div_ceil(per_pass);
        self.global_batch = global_batch;
        self.tokens_per_step = global_batch.saturating_mul(self.model.n_ctx as usize);
        self
    }
}

/// Checks `cfg` (read from `path`) and derives the job's numbers.
pub fn resolve(cfg: &JobConfig, path: &Path) -> Result<JobSpec, ConfigError> {
    let bad =
        |key: &str, message: String| ConfigError::Invalid { path: path.to_path_buf(), key: key.to_string(), message };
    let positive = |key: &str, v: u64| {
        if v == 0 { Err(bad(key, "must be at least 1".into())) } else { Ok(v) }
    };
    let keyed = |(key, message): (String, String)| bad(&key, message);
    let positive_f = |key: &str, v: f64| {
        if v.is_finite() && v > 0.0 { Ok(v) } else { Err(bad(key, format!("must be a positive number, got {v}"))) }
    };
    let has_training = cfg.train.is_some() || cfg.roles.is_empty();
    let train_section = cfg.train.clone().unwrap_or_default();
    let (job, train, model, data) = (&cfg.job, &train_section, &cfg.model, &cfg.data);

    let name_ok = !job.name.is_empty()
        && job.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !job.name.starts_with('.');
    if !name_ok {
        return Err(bad(
            "job.name",
            format!("`{}` must be a non-empty name of letters, digits, `-`, `_` or `.`", job.name),
        ));
    }
    if job.run_dir.is_empty() {
        return Err(bad("job.run_dir", "must name a directory".into()));
    }
    let entrypoint = if job.entrypoint.is_empty() { None } else { Some(job.entrypoint.clone()) };
    if entrypoint.as_ref().is_some_and(|e| e[0].is_empty()) {
        return Err(bad("job.entrypoint", "the program name is empty".into()));
    }

    let (min_workers, workers) = match train.workers {
        Workers::Fixed(n) => {
            let n = positive("train.workers", n)? as usize;
            (n, n)
        }
        Workers::Elastic { min, max } => {
            let min = positive("train.workers.min", min)? as usize;
            let max = positive("train.workers.max", max)? as usize;
            if max < min {
                return Err(bad("train.workers.max", format!("must be at least train.workers.min ({min}), got {max}")));
            }
            (min, max)
        }
    };
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
    let device = train.device;
    let backend = match (train.backend, device) {
        // Every rank of a job runs on the launcher's host, where shared memory is the fastest path.
        (BackendChoice::Auto, DeviceKind::Cpu) => BackendKind::Shm { or_tcp: true },
        (BackendChoice::Shm, DeviceKind::Cpu) => BackendKind::Shm { or_tcp: false },
        (BackendChoice::Tcp, DeviceKind::Cpu) => BackendKind::Tcp,
        (BackendChoice::Auto | BackendChoice::Nccl, DeviceKind::Cuda) => BackendKind::Nccl,
        (cpu @ (BackendChoice::Tcp | BackendChoice::Shm), DeviceKind::Cuda) => {
            return Err(bad(
                "train.backend",
                format!("{cpu} reduces CPU tensors; use \"nccl\" (or \"auto\") with device \"cuda\""),
            ));
        }
        (BackendChoice::Nccl, DeviceKind::Cpu) => {
            return Err(bad(
                "train.backend",
                "nccl needs CUDA tensors; use \"shm\", \"tcp\" (or \"auto\") with device \"cpu\"".into(),
            ));
        }
    };
    let cpus_per_worker =
        cpu_share("train.cpus_per_worker", train.cpus_per_worker).map_err(|m| bad("train.cpus_per_worker", m))?;
    let collective_timeout = seconds("train.collective_timeout_s", train.collective_timeout_s, false).map_err(keyed)?;
    let bucket_bytes = (positive_f("train.bucket_mb", train.bucket_mb)? * (1 << 20) as f64) as usize;

    // A Hugging Face model folder, for the trainers that take one.
    let model_folder = || {
        if model.path.is_empty() || !Path::new(&model.path).join("config.json").exists() {
            return Err(bad("model.path", format!("`{}` is not a model folder (no config.json there)", model.path)));
        }
        Ok(())
    };
    let trainer = match (train.trainer, model.kind) {
        (TrainerChoice::Lm, ModelKind::Gpt) => TrainerKind::Lm,
        (TrainerChoice::Sft, ModelKind::Hf) => {
            model_folder()?;
            let max_len = positive("data.max_len", data.max_len)? as usize;
            TrainerKind::Sft {
                model: PathBuf::from(&model.path),
                max_len,
                random_init: model.init == ModelInit::Random,
            }
        }
        (choice @ (TrainerChoice::Grpo | TrainerChoice::Ppo), ModelKind::Hf) => {
            model_folder()?;
            if model.init == ModelInit::Random {
                return Err(bad(
                    "model.init",
                    "RL starts from a trained policy; \"random\" is for train.trainer = \"sft\"".to_string(),
                ));
            }
            let Some(section) = &cfg.rl else {
                return Err(bad(
                    "rl",
                    format!("train.trainer = \"{choice}\" needs an [rl] section (at least [rl.reward])"),
                ));
            };
            let algorithm = if choice == TrainerChoice::Grpo { RlAlgorithm::Grpo } else { RlAlgorithm::Ppo };
            let rl = resolve_rl(section, algorithm, workers).map_err(keyed)?;
            let max_len = positive("data.max_len", data.max_len)? as usize;
            TrainerKind::Rl { model: PathBuf::from(&model.path), max_len, rl: Box::new(rl) }
        }
        (choice @ (TrainerChoice::Dpo | TrainerChoice::Rm), ModelKind::Hf) => {
            model_folder()?;
            if model.init == ModelInit::Random {
                return Err(bad(
                    "model.init",
                    format!("train.trainer = \"{choice}\" starts from trained weights; \"random\" is for \"sft\""),
                ));
            }
            let is_dpo = choice == TrainerChoice::Dpo;
            let (objective, eval) =
                resolve_objective(cfg.dpo.as_ref(), is_dpo, &data.eval_path, data.eval_fraction).map_err(keyed)?;
            let max_len = positive("data.max_len", data.max_len)? as usize;
            TrainerKind::Preference(Box::new(PreferenceSpec {
                model: PathBuf::from(&model.path),
                max_len,
                objective,
                eval,
            }))
        }
        (TrainerChoice::Dpo | TrainerChoice::Rm, other) => {
            return Err(bad(
                "model.kind",
                format!("`{other}` cannot learn from preferences; train.trainer needs \"hf\" with model.path"),
            ));
        }
        (TrainerChoice::Grpo | TrainerChoice::Ppo, other) => {
            return Err(bad(
                "model.kind",
                format!("`{other}` cannot be post-trained; RL needs \"hf\" with model.path"),
            ));
        }
        (TrainerChoice::Lm, other) => {
            return Err(bad(
                "model.kind",
                format!("`{other}` cannot be trained by train.trainer = \"lm\"; use \"gpt\""),
            ));
        }
        (TrainerChoice::Sft, other) => {
            return Err(bad(
                "model.kind",
                format!("`{other}` cannot be fine-tuned; train.trainer = \"sft\" needs \"hf\" with model.path"),
            ));
        }
    };
    // Settings only some trainers read are refused elsewhere rather than silently ignored.
    let preference = matches!(trainer, TrainerKind::Preference(_));
    if cfg.rl.is_some() && !matches!(trainer, TrainerKind::Rl { .. }) {
        return Err(bad("rl", "is read only by train.trainer = \"grpo\" or \"ppo\"; remove the section".into()));
    }
    if cfg.dpo.is_some() && !preference {
        return Err(bad("dpo", "is read only by train.trainer = \"dpo\"; remove the section".into()));
    }
    let eval = resolve_eval(cfg, &trainer).map_err(keyed)?;
    if eval.is_some() && entrypoint.is_some() {
        return Err(bad(
            "eval.every",
            "is for the built-in trainers; a job.entrypoint program evaluates itself (and may report eval_loss)".into(),
        ));
    }
    if trainer == TrainerKind::Lm {
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
            return Err(bad(
                "model.n_embd",
                format!("must be a multiple of model.n_head ({}), got {}", model.n_head, model.n_embd),
            ));
        }
    }
    if trainer == TrainerKind::Lm && model.vocab_size > 256 {
        return Err(bad(
            "model.vocab_size",
            format!("the byte-level trainer needs at most 256, got {}", model.vocab_size),
        ));
    }
    let data_spec = match data.source.as_str() {
        "" => return Err(bad("data.source", "use \"synthetic\" or a path to a text file".into())),
        "synthetic" if preference => {
            return Err(bad(
                "data.source",
                "preference training reads a JSONL file of {\"prompt\", \"chosen\", \"rejected\"} lines; name it here"
                    .into(),
            ));
        }
        "synthetic" if !matches!(trainer, TrainerKind::Lm) => {
            return Err(bad(
                "data.source",
                "fine-tuning reads a JSONL file of {\"prompt\", \"response\"} or {\"messages\"} lines; name it here"
                    .into(),
            ));
        }
        "synthetic" => {
            let needed = model.n_ctx as u64 + 2;
            if data.synthetic_bytes < needed {
                return Err(bad("data.synthetic_bytes", format!("must be at least n_ctx + 2 = {needed}")));
            }
            DataSpec::Synthetic { bytes: data.synthetic_bytes as usize }
        }
        file => DataSpec::File(PathBuf::from(file)),
    };

    // Token slots per sequence: the context of the built-in GPT, the cut of fine-tuning examples.
    let seq_len = match &trainer {
        TrainerKind::Lm => model.n_ctx,
        TrainerKind::Sft { max_len, .. } | TrainerKind::Rl { max_len, .. } => *max_len as i64,
        TrainerKind::Preference(p) => p.max_len as i64,
    };

    let rendezvous = &cfg.rendezvous;
    let rendezvous_timeout = seconds("rendezvous.timeout_s", rendezvous.timeout_s, false).map_err(keyed)?;
    let heartbeat_interval = seconds("rendezvous.heartbeat_s", rendezvous.heartbeat_s, false).map_err(keyed)?;

    let ck = &cfg.checkpoint;
    let order = match ck.mode {
        OrderChoice::Min => MetricOrder::Min,
        OrderChoice::Max => MetricOrder::Max,
    };
    let checkpoint = CheckpointSpec {
        every: ck.every,
        keep_last: positive("checkpoint.keep_last", ck.keep_last)? as usize,
        keep_best: ck.keep_best as usize,
        metric: ck.metric,
        order,
        async_save: ck.async_save,
    };
    if ck.metric == MetricChoice::EvalLoss {
        let every = eval.as_ref().map_or(0, |e| e.every);
        if every == 0 {
            return Err(bad("checkpoint.metric", "\"eval_loss\" needs evaluations: set eval.every".into()));
        }
        // The last step is always evaluated, so saving only it (every = 0) is fine too.
        if ck.every > 0 && !ck.every.is_multiple_of(every) {
            return Err(bad(
                "checkpoint.every",
                format!(
                    "must be a multiple of eval.every ({every}) with checkpoint.metric = \"eval_loss\", so each \
                     checkpoint is ranked by an evaluation of its own weights; got {}",
                    ck.every
                ),
            ));
        }
    }
    let f = &cfg.fault;
    let fault = FaultSpec {
        max_restarts: restarts("fault.max_restarts", f.max_restarts).map_err(keyed)?,
        max_user_restarts: restarts("fault.max_user_restarts", f.max_user_restarts).map_err(keyed)?,
        heartbeat_timeout: seconds("fault.heartbeat_timeout_s", f.heartbeat_timeout_s, false).map_err(keyed)?,
        backoff: seconds("fault.backoff_s", f.backoff_s, true).map_err(keyed)?,
        max_backoff: seconds("fault.max_backoff_s", f.max_backoff_s, false).map_err(keyed)?,
        stop_grace: seconds("fault.stop_grace_s", f.stop_grace_s, true).map_err(keyed)?,
    };
    if fault.heartbeat_timeout <= heartbeat_interval {
        return Err(bad(
            "fault.heartbeat_timeout_s",
            format!(
                "must be longer than rendezvous.heartbeat_s ({}), got {}",
                rendezvous.heartbeat_s, f.heartbeat_timeout_s
            ),
        ));
    }

    // Sizes no machine holds are refused here rather than overflowing below.
    let global_batch = workers
        .checked_mul(micro_batch)
        .and_then(|b| b.checked_mul(grad_accum))
        .filter(|b| b.checked_mul(seq_len as usize).is_some())
        .ok_or_else(|| {
            bad(
                "train.micro_batch",
                format!(
                    "train.workers × train.micro_batch × train.grad_accum × the sequence length ({workers} × {micro_batch} × \
                     {grad_accum} × {seq_len}) is past any batch a machine can hold"
                ),
            )
        })?;
    let mut roles = Vec::new();
    if has_training {
        roles.push(RoleSpec {
            name: TRAINING_ROLE.into(),
            size: workers,
            min_size: min_workers,
            program: match &entrypoint {
                Some(cmd) => RoleProgram::Command(cmd.clone()),
                None => RoleProgram::Worker,
            },
            restart: RestartMode::Gang,
            cpus_per_worker,
            gpus_per_worker: usize::from(device == DeviceKind::Cuda),
            on_training_gpus: false,
            max_restarts: fault.max_restarts.saturating_add(fault.max_user_restarts),
            backoff: fault.backoff,
            training: true,
        });
    }
    for (name, role) in &cfg.roles {
        roles.push(resolve_role(name, role, &trainer).map_err(|(key, message)| bad(&key, message))?);
    }
    if let TrainerKind::Rl { rl, .. } = &trainer {
        if rl.colocate && device != DeviceKind::Cuda {
            return Err(bad(
                "rl.colocate",
                "puts the rollout actors on the trainer's GPUs; it needs train.device = \"cuda\"".into(),
            ));
        }
        roles.push(RoleSpec {
            name: ROLLOUT_ROLE.into(),
            size: rl.rollout_workers,
            min_size: rl.rollout_workers,
            program: RoleProgram::BuiltIn(ROLLOUT_ROLE.into()),
            restart: RestartMode::Alone,
            cpus_per_worker: rl.rollout_cpus,
            gpus_per_worker: usize::from(device == DeviceKind::Cuda && !rl.colocate),
            on_training_gpus: rl.colocate,
            max_restarts: rl.rollout_max_restarts as u32,
            backoff: fault.backoff,
            training: false,
        });
    }
    let mut env = Vec::new();
    for (name, value) in &job.env {
        let key = format!("job.env.{name}");
        let ok_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !ok_name {
            return Err(bad(
                &key,
                "must be a variable name of letters, digits and `_`, not starting with a digit".into(),
            ));
        }
        if crate::contract::is_reserved(name) {
            let why = match name.as_str() {
                "OMP_NUM_THREADS" => "follows train.cpus_per_worker (or the launching shell's OMP_NUM_THREADS)",
                "CUDA_VISIBLE_DEVICES" => {
                    "is set from the GPUs placed for each worker (the launching shell's \
                                          CUDA_VISIBLE_DEVICES limits which ones rtrain may use)"
                }
                _ => {
                    "is set by rtrain for each worker (ranks, rendezvous, its own RTRAIN_ variables); use another name"
                }
            };
            return Err(bad(&key, why.into()));
        }
        if value.contains('\0') {
            return Err(bad(&key, "must not contain a NUL character".into()));
        }
        env.push((name.clone(), value.clone()));
    }
    let cluster = resolve_cluster(&cfg.cluster).map_err(keyed)?;
    if cluster.multi_host() && !has_training {
        return Err(bad(
            "cluster.hosts",
            "a job over several hosts spreads its training role over them; this job has none".into(),
        ));
    }
    Ok(JobSpec {
        name: job.name.clone(),
        run_path: Path::new(&job.run_dir).join(&job.name),
        working_dir: PathBuf::from(if job.working_dir.is_empty() { "." } else { &job.working_dir }),
        seed: job.seed,
        entrypoint,
        env,
        echo: job.echo,
        trainer,
        workers,
        min_workers,
        steps,
        micro_batch,
        grad_accum,
        global_batch,
        tokens_per_step: global_batch * seq_len as usize,
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
        precision: train.precision,
        tf32: train.tf32,
        model: ModelSpec {
            n_layer: model.n_layer,
            n_head: model.n_head,
            n_embd: model.n_embd,
            n_ctx: seq_len,
            vocab_size: model.vocab_size,
        },
        data: data_spec,
        rendezvous_timeout,
        heartbeat_interval,
        checkpoint,
        eval,
        fault,
        user: cfg.user.clone(),
        roles,
        cluster,
    })
}

/// A CPU share: positive, finite, at most 1024 cores.
fn cpu_share(key: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 && v <= 1024.0 {
        Ok(v)
    } else {
        Err(format!(
            "must be a number of cores above 0 and at most 1024 (fractions share a core), got {v}; {key} = 0.5 is half a core"
        ))
    }
}

/// Checks one `[roles.NAME]` table; errors carry the dotted key.
fn resolve_role(name: &str, role: &super::RoleSection, trainer: &TrainerKind) -> Result<RoleSpec, (String, String)> {
    let key = |k: &str| format!("roles.{name}.{k}");
    let valid_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
    if !valid_name {
        return Err((format!("roles.{name}"), "a role name is letters, digits, `-` or `_`".into()));
    }
    if name == TRAINING_ROLE {
        return Err((
            format!("roles.{name}"),
            format!("`{TRAINING_ROLE}` is the role of the [train] section; give this role another name"),
        ));
    }
    let (min_size, size) = match role.size {
        Workers::Fixed(0) => return Err((key("size"), "must be at least 1".into())),
        Workers::Fixed(n) => (n, n),
        Workers::Elastic { min, max } if min == 0 || max < min => {
            return Err((key("size"), format!("needs 1 <= min <= max, got min = {min}, max = {max}")));
        }
        Workers::Elastic { min, max } => (min, max),
    };
    if size > 4096 {
        return Err((key("size"), format!("at most 4096 processes per role, got {size}")));
    }
    if name == ROLLOUT_ROLE && matches!(trainer, TrainerKind::Rl { .. }) {
        return Err((
            format!("roles.{name}"),
            "the rollout actors of [rl] are this role; size them with rl.rollout_workers and rl.rollout_cpus".into(),
        ));
    }
    let program = match (&role.program, role.entrypoint.is_empty()) {
        (Some(_), false) => {
            return Err((key("program"), "give either a command (entrypoint) or a built-in program, not both".into()));
        }
        (Some(p), true) if !BUILTIN_PROGRAMS.contains(&p.as_str()) => {
            return Err((
                key("program"),
                format!("`{p}` is not a built-in program; built-in: {}", BUILTIN_PROGRAMS.join(", ")),
            ));
        }
        (Some(p), true) if p == ROLLOUT_ROLE && !matches!(trainer, TrainerKind::Rl { .. }) => {
            return Err((
                key("program"),
                "rollout actors feed an RL trainer; set train.trainer = \"grpo\" or \"ppo\" with an [rl] section (which adds them)".into(),
            ));
        }
        (Some(p), true) => RoleProgram::BuiltIn(p.clone()),
        (None, _) if role.entrypoint.first().is_none_or(|p| p.is_empty()) => {
            return Err((
                key("entrypoint"),
                "name the command each process runs, e.g. [\"python3\", \"actor.py\"], or a built-in program".into(),
            ));
        }
        (None, _) => RoleProgram::Command(role.entrypoint.clone()),
    };
    let cpus_per_worker =
        cpu_share(&key("cpus_per_worker"), role.cpus_per_worker).map_err(|m| (key("cpus_per_worker"), m))?;
    let backoff = seconds(&key("backoff_s"), role.backoff_s, true)?;
    let max_restarts = restarts(&key("max_restarts"), role.max_restarts)?;
    Ok(RoleSpec {
        name: name.to_string(),
        size: size as usize,
        min_size: min_size as usize,
        program,
        restart: role.restart,
        cpus_per_worker,
        gpus_per_worker: role.gpus_per_worker.min(64) as usize,
        on_training_gpus: false,
        max_restarts,
        backoff,
        training: false,
    })
}
