//! The TOML schema as written by users: lenient types with defaults, unknown keys refused.
//! [`super::resolve`] turns it into the strict [`super::JobSpec`] the code uses.

use serde::{Deserialize, Serialize};

use super::choice::choice;
use super::resolve::{DeviceKind, Precision};

choice!(
    /// `train.trainer`: the built-in training loop.
    TrainerChoice, "a built-in trainer", { Lm = "lm", Sft = "sft", Grpo = "grpo", Ppo = "ppo", Dpo = "dpo", Rm = "rm" }
);
choice!(
    /// `train.backend`: the trainer gang's collective.
    BackendChoice, "a backend", { Auto = "auto", Shm = "shm", Tcp = "tcp", Nccl = "nccl" }
);
choice!(
    /// `model.kind`: the built-in GPT, or a Hugging Face model folder.
    ModelKind, "a model kind", { Gpt = "gpt", Hf = "hf" }
);
choice!(
    /// `model.init`: a Hugging Face folder's weights, or its architecture from random weights.
    ModelInit, "a model initialisation", { Load = "load", Random = "random" }
);
choice!(
    /// `job.echo`: whose output of the job's own programs goes to the terminal as it comes.
    EchoChoice, "an echo choice", { Rank0 = "rank0", All = "all", Off = "off" }
);
choice!(
    /// `checkpoint.metric`: what `keep_best` ranks checkpoints by.
    MetricChoice, "a metric", { Loss = "loss", EvalLoss = "eval_loss" }
);
choice!(
    /// `checkpoint.mode`: which end of the metric is best.
    OrderChoice, "an order", { Min = "min", Max = "max" }
);

/// A job config file (`rtrain launch FILE`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    #[serde(default)]
    pub job: JobSection,
    /// The training role (a gang named `trainer`). A config with neither `[train]` nor
    /// `[roles.*]` trains with the defaults; one with roles only has no training role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainSection>,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub rendezvous: RendezvousSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub fault: FaultSection,
    /// Further roles of the job, by name: actors, services, anything beside the trainer gang.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub roles: std::collections::BTreeMap<String, RoleSection>,
    /// RL post-training (`train.trainer = "grpo"` or `"ppo"`): rollouts, rewards, losses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl: Option<super::rl::RlSection>,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub dashboard: DashboardSection,
    /// A job over several hosts: how many, where the coordinator listens, the token file.
    #[serde(default, skip_serializing_if = "ClusterSection::is_default")]
    pub cluster: ClusterSection,
    /// Held-out evaluation during training (`train.trainer = "lm"` or `"sft"`).
    #[serde(default)]
    pub eval: EvalSection,
    /// Direct preference optimisation (`train.trainer = "dpo"`): β and the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<super::preference::DpoSection>,
    /// Free-form settings handed to custom training loops (like Ray Train's `train_loop_config`).
    #[serde(default)]
    pub user: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobSection {
    /// Run name: output goes to `<run_dir>/<name>/`.
    pub name: String,
    pub run_dir: String,
    pub seed: u64,
    /// Where the job's processes run and relative paths of the config resolve (`run_dir`,
    /// `model.path`, `data.source`, ...): relative to the config file's folder; empty is that
    /// folder. [`super::load`] makes it (and those paths) absolute.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// Command each worker runs (in `working_dir`); empty means the built-in worker
    /// (`rtrain-worker worker`).
    pub entrypoint: Vec<String>,
    /// Environment variables set for every process of the job (after rtrain's own, which they
    /// cannot replace).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// The output of the job's own programs (`entrypoint`, a role's command) is shown on the
    /// terminal line by line, prefixed `role:rank| `: of rank 0 of each role (`rank0`), of every
    /// process (`all`), or of none (`off`). It always goes to the log files.
    pub echo: EchoChoice,
}

impl Default for JobSection {
    fn default() -> Self {
        Self {
            name: "run".into(),
            run_dir: "runs".into(),
            seed: 0,
            working_dir: String::new(),
            entrypoint: Vec::new(),
            env: std::collections::BTreeMap::new(),
            echo: EchoChoice::Rank0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// The built-in training loop: `lm` (language modelling on bytes) or `sft` (supervised
    /// fine-tuning of a Hugging Face model on prompt/response data).
    pub trainer: TrainerChoice,
    /// A fixed gang size, or `{ min = 1, max = 4 }` for an elastic one.
    pub workers: Workers,
    pub steps: u64,
    pub micro_batch: u64,
    pub grad_accum: u64,
    pub lr: f64,
    /// Floor of the cosine schedule; defaults to lr / 10.
    pub min_lr: Option<f64>,
    /// Linear warm-up length; defaults to 10 steps (or train.steps when shorter).
    pub warmup_steps: Option<u64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    pub device: DeviceKind,
    pub backend: BackendChoice,
    /// CPU cores reserved per worker by the gang scheduler; may be fractional (`0.5`).
    pub cpus_per_worker: f64,
    /// Seconds any collective may wait for a peer before the attempt fails.
    pub collective_timeout_s: f64,
    /// DDP all-reduce bucket size in MiB.
    pub bucket_mb: f64,
    /// `fp32`, or `bf16`: forward passes under bf16 autocast (matmuls in bf16, reductions and
    /// losses in float32), with float32 weights, gradients and optimizer state.
    pub precision: Precision,
    /// Float32 matmuls and convolutions on CUDA use TF32 tensor cores (float32's range, a 10-bit
    /// mantissa); `false` keeps them in full float32. No effect on CPU.
    pub tf32: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            trainer: TrainerChoice::Lm,
            workers: Workers::Fixed(1),
            steps: 100,
            micro_batch: 16,
            grad_accum: 1,
            lr: 3e-4,
            min_lr: None,
            warmup_steps: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            device: DeviceKind::Cpu,
            backend: BackendChoice::Auto,
            cpus_per_worker: 1.0,
            collective_timeout_s: 120.0,
            bucket_mb: 25.0,
            precision: Precision::Fp32,
            tf32: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `gpt`: the built-in byte-level GPT, trained from scratch with the sizes below; `hf`: a
    /// Hugging Face model folder (`path`), for fine-tuning.
    pub kind: ModelKind,
    /// The model folder of `kind = "hf"` (config.json, *.safetensors, tokenizer.json).
    pub path: String,
    /// `load` the folder's weights, or start from `random` ones (its config.json and tokenizer
    /// only; supervised fine-tuning from scratch).
    pub init: ModelInit,
    pub n_layer: i64,
    pub n_head: i64,
    pub n_embd: i64,
    /// Context length in tokens.
    pub n_ctx: i64,
    pub vocab_size: i64,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            kind: ModelKind::Gpt,
            path: String::new(),
            init: ModelInit::Load,
            n_layer: 4,
            n_head: 4,
            n_embd: 256,
            n_ctx: 128,
            vocab_size: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Language modelling: `synthetic` (generated from the seed) or a text file, read as bytes.
    /// Supervised fine-tuning: a JSONL file of `{"prompt", "response"}` or `{"messages"}` lines.
    pub source: String,
    /// Size of the generated corpus in bytes.
    pub synthetic_bytes: u64,
    /// Supervised fine-tuning: examples are cut to this many tokens.
    pub max_len: u64,
    /// Preference training: held-out pairs (JSONL like `source`), scored before and after.
    pub eval_path: String,
    /// Preference training: the share of `source` held out instead (default 0.05).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_fraction: Option<f64>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            source: "synthetic".into(),
            synthetic_bytes: 4 << 20,
            max_len: 256,
            eval_path: String::new(),
            eval_fraction: None,
        }
    }
}

/// `[metrics]`: where a run's metrics go besides metrics.jsonl.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// TensorBoard event files in `<run>/tensorboard/`.
    pub tensorboard: bool,
}

/// `[eval]`: the held-out loss, every `every` steps and after the last, over `batches` global
/// batches of the held-out split (`data.eval_fraction` or `data.eval_path`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Steps between evaluations; 0 evaluates never.
    pub every: u64,
    /// Global batches (train.micro_batch × train.grad_accum × workers sequences) per evaluation.
    pub batches: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self { every: 0, batches: 8 }
    }
}

/// `[dashboard]`: the page a launch serves on loopback (its URL is printed at the start).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardSection {
    pub enabled: bool,
    /// The port on 127.0.0.1; 0 takes a free one.
    pub port: u16,
}

impl Default for DashboardSection {
    fn default() -> Self {
        Self { enabled: true, port: 0 }
    }
}

/// `[cluster]`: a job over several hosts. The driver's host is one of them; every other runs
/// `rtrain agent --join <bind> --token-file <token_file>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Hosts the job runs on, counting the driver's own; the gang waits for them up to
    /// `rendezvous.timeout_s`.
    pub hosts: u64,
    /// `ADDRESS:PORT` the coordinator listens on for the other hosts (port 0 takes a free one);
    /// empty: loopback, for a job on one host.
    pub bind: String,
    /// The job token: read from this file, or written there (mode 0600) when it does not exist.
    /// Relative to `job.working_dir`. Empty: a new token for every launch, kept in memory.
    pub token_file: String,
    /// Your own TLS files for the coordinator (PEM; all three or none): its certificate, issued
    /// for the name `rtrain-coordinator`, its key (mode 0600), and the CA that issued it, which the
    /// agents are given with `--ca-file`. None: the driver makes a CA for each launch and writes its
    /// certificate beside the token file.
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_ca: String,
    /// The most megabytes of `job.working_dir` shipped to the other hosts at each launch.
    pub max_working_dir_mb: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            hosts: 1,
            bind: String::new(),
            token_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            max_working_dir_mb: 100,
        }
    }
}

impl ClusterSection {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RendezvousSection {
    /// Seconds to wait for the whole gang to register before the attempt fails.
    pub timeout_s: f64,
    /// Seconds between worker heartbeats.
    pub heartbeat_s: f64,
}

impl Default for RendezvousSection {
    fn default() -> Self {
        Self { timeout_s: 60.0, heartbeat_s: 1.0 }
    }
}

/// `train.workers`: `4`, or `{ min = 1, max = 4 }`. An elastic gang starts with as many workers
/// as can be placed (at least `min`) and keeps the global batch of `max` workers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged, deny_unknown_fields, expecting = "an integer, or a table like { min = 1, max = 4 } (no other keys)")]
pub enum Workers {
    Fixed(u64),
    Elastic { min: u64, max: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every this many optimizer steps; 0 saves only the final step.
    pub every: u64,
    /// Newest checkpoints kept.
    pub keep_last: u64,
    /// Best checkpoints kept by `metric`, besides the newest ones.
    pub keep_best: u64,
    /// What `keep_best` ranks by: the step's `loss`, or the latest `eval_loss` (`[eval]`).
    pub metric: MetricChoice,
    /// `min` or `max`: which end of `metric` is best.
    pub mode: OrderChoice,
    /// Copy the tensors in memory and write in the background (the step loop stalls only for
    /// the copy); `false` writes before the next step.
    #[serde(rename = "async")]
    pub async_save: bool,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 100,
            keep_last: 3,
            keep_best: 0,
            metric: MetricChoice::Loss,
            mode: OrderChoice::Min,
            async_save: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSection {
    /// Restarts allowed after infrastructure failures: a worker killed by a signal, a hung
    /// worker, a lost peer.
    pub max_restarts: u64,
    /// Restarts allowed after failures of the training code itself: an error or a panic, a
    /// non-zero exit.
    pub max_user_restarts: u64,
    /// A worker that sends no heartbeat for this many seconds is declared hung and restarted.
    pub heartbeat_timeout_s: f64,
    /// Delay before a restart, doubled for each further failure in a row of attempts that did
    /// not complete a step (an attempt that trains resets it).
    pub backoff_s: f64,
    /// Longest delay between restarts.
    pub max_backoff_s: f64,
    /// When the launch is stopped (Ctrl-C, SIGTERM, `rtrain stop`), how long the workers get
    /// after SIGTERM to save a checkpoint and exit before SIGKILL.
    pub stop_grace_s: f64,
}

impl Default for FaultSection {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            max_user_restarts: 0,
            heartbeat_timeout_s: 30.0,
            backoff_s: 0.25,
            max_backoff_s: 30.0,
            stop_grace_s: 60.0,
        }
    }
}

/// `[roles.NAME]`: a group of processes with its own ranks, resources and restart policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleSection {
    /// How many processes: `2`, or `{ min = 1, max = 4 }` (as many as fit, at least `min`).
    pub size: Workers,
    /// The command each process runs (`ROLE_NAME`, `ROLE_RANK`, `RTRAIN_*` tell it who it is).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// A program built into rtrain instead of a command (see `BUILTIN_PROGRAMS`).
    #[serde(default)]
    pub program: Option<String>,
    /// `alone`: a process that dies or hangs restarts by itself; `gang`: the whole role restarts.
    #[serde(default)]
    pub restart: RestartMode,
    /// CPU cores reserved per process; fractional shares (`0.25`) let light processes share a core.
    #[serde(default = "one")]
    pub cpus_per_worker: f64,
    #[serde(default)]
    pub gpus_per_worker: u64,
    /// Restarts this role may use (of single processes, or of the whole role) before the job fails.
    #[serde(default = "ten")]
    pub max_restarts: u64,
    /// Seconds between restarts of one process, doubled for each failure in a row.
    #[serde(default = "quarter")]
    pub backoff_s: f64,
}

fn one() -> f64 {
    1.0
}
fn ten() -> u64 {
    10
}
fn quarter() -> f64 {
    0.25
}

/// What happens when a process of a role fails.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// The process restarts by itself; every other process keeps running.
    #[default]
    Alone,
    /// The whole role stops and starts again as a new attempt.
    Gang,
}
