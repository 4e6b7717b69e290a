//! The `rtrain` command line. `main.rs` only calls [`main`]; tests call the same functions.

/// `eprintln!` that never panics: a launch whose terminal went away (`| head`, a closed ssh
/// session) keeps supervising its workers; only what it would have printed is lost.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!` that never panics (see `say!`).
macro_rules! say_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod ckpt;
mod runs;

pub(crate) use runs::log_path;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use crate::bench::{self, BenchCommand};
use crate::config::preference::Objective;
use crate::config::rl::EvalSet;
use crate::config::{self, LoadedConfig, TrainerKind};
use crate::launch::{LaunchOptions, Outcome, WorkerProgram, launch};
use ckpt::CkptCommand;

/// Exit code for a config or usage error.
pub const EXIT_CONFIG: u8 = crate::exit::USAGE;
/// Exit code for a launch that failed.
pub const EXIT_FAILED: u8 = crate::exit::FAILED;

/// The binary, installed beside `rtrain`, that runs the commands needing libtorch: built-in
/// workers, `generate`, `score` and the tensor benchmarks. `rtrain` itself does not link libtorch
/// (whose start-up alone takes about 0.3 s), so launching, validating and checkpoint commands
/// start at once.
pub const WORKER_BIN: &str = "rtrain-worker";

/// The command line of `rtrain` (and of `rtrain-worker`, which parses the same arguments).
#[derive(Parser, Debug)]
#[command(name = "rtrain", version, about = "Distributed training orchestrator: gang-scheduled data-parallel training")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a job config and print what it resolves to.
    Validate(ConfigArgs),
    /// Run a job: schedule the trainer gang, start the workers, supervise them to the end.
    Launch(LaunchArgs),
    /// Measure a part of the system against its ceiling.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Generate text from a Hugging Face model folder (temperature 0 = greedy).
    Generate(GenerateArgs),
    /// Per-token log-probabilities of a text under a Hugging Face model folder.
    Score(ScoreArgs),
    /// List, inspect or verify the checkpoints of a run.
    #[command(subcommand)]
    Ckpt(CkptCommand),
    /// The runs under a run directory, newest first, with their state and step.
    Runs {
        /// The folder holding runs (a config's `job.run_dir`).
        #[arg(default_value = "runs")]
        dir: PathBuf,
    },
    /// A run's state: live (roles, processes with pid, step and last heartbeat, progress, ETA,
    /// attempts and their causes) or how it ended.
    Status {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
        /// The raw status (status.json while live, summary.json after) as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A process's log: the training role's latest attempt, or a side role's.
    Logs {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
        /// The role whose process it is.
        #[arg(long, default_value = "trainer")]
        role: String,
        /// The process's rank within its role.
        #[arg(long, default_value_t = 0)]
        rank: usize,
        /// Keep printing what is written, across restarts, until the launch ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop a live run: the built-in trainers save a checkpoint at the end of their current
    /// step (a script gets SIGTERM to do the same), then the launch ends as interrupted;
    /// `rtrain launch` resumes it.
    Stop {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
        /// Seconds to wait for the launch to end.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Charts of a run's metrics (one per metric of each role) as SVG or PNG files.
    Plot {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
        /// Where the charts go (default `<RUN>/plots`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// svg (no fonts needed), or png (needs a TrueType font, e.g. Debian's fonts-dejavu-core).
        #[arg(long, value_enum, default_value_t = crate::plot::PlotFormat::Svg)]
        format: crate::plot::PlotFormat,
    },
    /// Serve the dashboard of a run, live or finished, on 127.0.0.1 until Ctrl-C (a launch
    /// serves its own; its URL is printed at the start).
    Dashboard {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
        /// The port; 0 takes a free one.
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Serve a job over several hosts from this host: join its coordinator and run the
    /// processes the driver places here (one agent per host besides the driver's).
    Agent {
        /// The coordinator's HOST:PORT (the job's `cluster.bind`).
        #[arg(long)]
        join: String,
        /// The job token (`cluster.token_file`; mode 0600). The job CA's certificate, which
        /// the driver writes beside it as `<FILE>.ca.pem`, proves the coordinator.
        #[arg(long)]
        token_file: PathBuf,
        /// The job CA's certificate, if not beside the token file.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// This host's name in the job (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// The address other hosts reach this one at (default: the one facing the coordinator).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Seconds to keep trying to join (the driver may start after its agents).
        #[arg(long, default_value_t = 300.0)]
        wait_s: f64,
        /// Where the job's shipped working directories are kept (default: $RTRAIN_CACHE_DIR,
        /// $XDG_CACHE_HOME/rtrain or ~/.cache/rtrain).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Run a job on a Slurm cluster.
    #[command(subcommand)]
    Slurm(SlurmCommand),
    /// Run a job on a Kubernetes cluster.
    #[command(subcommand)]
    K8s(K8sCommand),
    /// Run as a built-in worker (started by `rtrain launch`, not by hand).
    #[command(hide = true)]
    Worker,
    /// Run a built-in role program such as `rollout` (started by `rtrain launch`, not by hand).
    #[command(hide = true)]
    Role { name: String },
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// The job config (TOML).
    pub file: PathBuf,
    /// Override a key by its dotted path, e.g. `--set train.workers=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum SlurmCommand {
    /// Write the job's batch script beside its run directory and submit it with sbatch: on the
    /// first node `rtrain launch` starts an agent on each other node with srun.
    Submit {
        #[command(flatten)]
        config: ConfigArgs,
        /// Nodes to allocate: the job's hosts.
        #[arg(long)]
        nodes: usize,
        #[arg(long)]
        partition: Option<String>,
        /// The time limit, as sbatch takes it (e.g. 2:00:00).
        #[arg(long)]
        time: Option<String>,
        /// Print the script instead of writing and submitting it.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum K8sCommand {
    /// Print the objects that run the job over N pods (`kubectl apply -f -`): a Secret with the
    /// job token and TLS files, the config as a ConfigMap, a headless Service and an Indexed Job.
    /// The Secret holds the token: keep the output out of logs.
    Manifest {
        #[command(flatten)]
        config: ConfigArgs,
        /// Pods: the job's hosts.
        #[arg(long)]
        nodes: usize,
        /// An image with rtrain, rtrain-worker, libtorch and the job's files.
        #[arg(long)]
        image: String,
        #[arg(long)]
        namespace: Option<String>,
        /// The coordinator's port on pod 0.
        #[arg(long, default_value_t = 29400)]
        port: u16,
        /// A ReadWriteMany PersistentVolumeClaim for the run directory (checkpoints and logs
        /// that every pod sees; without it each pod has its own and restarts cannot resume).
        #[arg(long)]
        run_claim: Option<String>,
        /// The job's working directory in the image.
        #[arg(long, default_value = "/workspace")]
        workdir: String,
        /// The rtrain executable in the image.
        #[arg(long, default_value = "rtrain")]
        rtrain: String,
    },
    /// What each pod of the manifest's Job runs: pod 0 (JOB_COMPLETION_INDEX) launches the job,
    /// the others join it as agents.
    Pod {
        #[command(flatten)]
        config: ConfigArgs,
        /// Pods in the job.
        #[arg(long)]
        hosts: usize,
        /// Pod 0's coordinator, HOST:PORT.
        #[arg(long)]
        driver: String,
        /// Where the Secret's files are mounted.
        #[arg(long)]
        secrets: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start over when the run directory already holds a run (the old one is moved aside).
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a run of the
    /// built-in GPT (its newest checkpoint) or one of its checkpoints.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to continue (with `--chat`: the user's message).
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A JSONL file of prompts (`{"prompt": ...}` per line, other fields ignored), generated in
    /// batches; prints one line per sequence, with the line number of its prompt (`--json`).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// The most tokens generated per sequence (it also ends at an EOS or a stop text).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampler: the same seed, prompt and settings give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences to sample for the prompt (one batch).
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// A text that ends a sequence (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// One JSON object per sequence: token_ids, text, logprobs, finish_reason.
    #[arg(long)]
    pub json: bool,
    /// Run on this CUDA device instead of the CPU.
    #[arg(long)]
    pub cuda: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// A model folder: config.json, *.safetensors, tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to score (encoded with the tokenizer's special tokens).
    #[arg(long)]
    pub text: String,
    /// One JSON object per token: token_id, token, logprob (null for the first).
    #[arg(long)]
    pub json: bool,
    /// Run on this CUDA device instead of the CPU.
    #[arg(long)]
    pub cuda: Option<usize>,
}

/// The `rtrain` binary.
pub fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Launch(_)
            | Command::Agent { .. }
            | Command::K8s(K8sCommand::Pod { .. })
            | Command::Worker
            | Command::Role { .. }
    ) {
        end_quietly_when_the_reader_goes();
    }
    match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Launch(args) => launch_command(&args, started, job_program),
        Command::Ckpt(cmd) => ckpt::run(cmd),
        Command::Runs { dir } => runs::runs_command(&dir),
        Command::Status { run, json } => runs::status_command(&run, json),
        Command::Logs { run, role, rank, follow } => runs::logs_command(&run, &role, rank, follow),
        Command::Plot { run, out, format } => match crate::plot::plot_run(&run, out.as_deref(), format) {
            Ok(summary) => {
                say!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                say!("error: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        },
        Command::Dashboard { run, port } => runs::dashboard_command(&run, port),
        Command::Stop { run, timeout_s } => runs::stop_command(&run, std::time::Duration::from_secs(timeout_s)),
        Command::Slurm(SlurmCommand::Submit { config, nodes, partition, time, dry_run }) => {
            slurm_submit(&config, crate::slurm::SubmitOptions { nodes, partition, time }, dry_run)
        }
        Command::K8s(K8sCommand::Manifest { config, nodes, image, namespace, port, run_claim, workdir, rtrain }) => {
            let opts = crate::k8s::ManifestOptions {
                nodes,
                image,
                namespace,
                port,
                run_claim,
                workdir,
                rtrain,
                overrides: config.overrides.clone(),
            };
            k8s_manifest(&config, &opts)
        }
        Command::K8s(K8sCommand::Pod { config, hosts, driver, secrets }) => {
            k8s_pod(config, hosts, &driver, &secrets, started)
        }
        Command::Agent { join, token_file, ca_file, name, address, wait_s, cache_dir } => {
            let opts = crate::host_agent::AgentOptions {
                join,
                token_file,
                ca_file,
                name,
                address,
                wait: std::time::Duration::from_secs_f64(wait_s.clamp(0.0, 1e6)),
                cache_dir: cache_dir.unwrap_or_else(crate::host_agent::default_cache_dir),
            };
            agent_command(opts)
        }
        Command::Bench(BenchCommand::Recovery { config, kills, steps_between, json }) => {
            bench::recovery_command(config, kills, steps_between, json)
        }
        Command::Bench(BenchCommand::ControlPlane { ranks, seconds, connections, json }) => {
            bench::control_plane_command(&ranks, seconds, connections, json)
        }
        // Arguments are checked here; the command runs in the binary that links libtorch.
        Command::Bench(_) | Command::Generate(_) | Command::Score(_) | Command::Worker | Command::Role { .. } => {
            exec_worker_binary()
        }
    }
}

fn slurm_submit(args: &ConfigArgs, opts: crate::slurm::SubmitOptions, dry_run: bool) -> ExitCode {
    let loaded = match load(args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if opts.nodes == 0 || opts.nodes as u64 > crate::config::MAX_HOSTS {
        say!("error: --nodes must be between 1 and {}", crate::config::MAX_HOSTS);
        return ExitCode::from(EXIT_CONFIG);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            say!("error: cannot find the running executable: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if let Err(e) = crate::slurm::check_submit(&loaded.spec, &opts) {
        say!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = std::path::absolute(&args.file).unwrap_or_else(|_| args.file.clone());
    let script = crate::slurm::sbatch_script(&loaded.spec, &config, &args.overrides, &exe, &opts);
    if dry_run {
        print!("{script}");
        return ExitCode::SUCCESS;
    }
    let submitted = crate::slurm::write_script(&loaded.spec, &script)
        .and_then(|path| crate::slurm::submit(&path).map(|id| (path, id)));
    match submitted {
        Ok((path, id)) => {
            say!("submitted Slurm job {id} ({})", path.display());
            say!(
                "  its output: {}",
                loaded.spec.run_path.with_file_name(format!("{}.slurm-{id}.out", loaded.spec.name)).display()
            );
            say!("  follow it: rtrain status {}", loaded.spec.run_path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// What the training role's workers run: the job's entrypoint, or the built-in worker.
fn job_program(loaded: &LoadedConfig) -> Result<WorkerProgram, String> {
    match &loaded.spec.entrypoint {
        Some(cmd) => Ok(WorkerProgram::External(cmd.clone())),
        None => worker_exe().map(|exe| WorkerProgram::Runtime(vec![exe.display().to_string(), "worker".into()])),
    }
}

fn k8s_manifest(args: &ConfigArgs, opts: &crate::k8s::ManifestOptions) -> ExitCode {
    let loaded = match load(args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            say!("error: cannot read {}: {e}", args.file.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match crate::k8s::manifest(&loaded.spec, &text, opts).and_then(|m| m.to_yaml()) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn k8s_pod(config: ConfigArgs, hosts: usize, driver: &str, secrets: &std::path::Path, started: Instant) -> ExitCode {
    let index = match std::env::var("JOB_COMPLETION_INDEX").ok().and_then(|i| i.parse::<usize>().ok()) {
        Some(i) => i,
        None => {
            say!("error: JOB_COMPLETION_INDEX is not set: `rtrain k8s pod` runs in a pod of an Indexed Job");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let pod_ip =
        std::env::var("POD_IP").ok().and_then(|ip| ip.parse().ok()).unwrap_or_else(crate::slurm::this_host_address);
    let name = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| format!("pod-{index}"));
    match crate::k8s::pod_role(index, pod_ip, hosts, driver, secrets, name) {
        Ok(crate::k8s::PodRole::Driver { overrides }) => {
            let mut config = config;
            config.overrides.extend(overrides);
            launch_command(&LaunchArgs { config, fresh: false }, started, job_program)
        }
        Ok(crate::k8s::PodRole::Agent(opts)) => agent_command(opts),
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn agent_command(opts: crate::host_agent::AgentOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say!("error: cannot start the agent's runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(crate::host_agent::run_agent(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("rtrain agent: error: {e}");
            ExitCode::from(if e.is_usage() { EXIT_CONFIG } else { EXIT_FAILED })
        }
    }
}

/// A command that prints ends quietly when its reader goes away (`rtrain ckpt inspect RUN | head`),
/// as Unix tools do: SIGPIPE ends the process, instead of the failed write panicking. Not for
/// `launch`, whose workers must not die with a closed terminal pipe.
pub fn end_quietly_when_the_reader_goes() {
    // SAFETY: restoring a signal's default disposition has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// [`WORKER_BIN`] beside the running executable.
pub fn worker_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
    let worker = exe.with_file_name(WORKER_BIN);
    if worker.is_file() {
        Ok(worker)
    } else {
        Err(format!(
            "{} is missing: rtrain runs built-in workers, generation and tensor benchmarks with it \
             (`cargo build --release` builds both binaries; install them side by side)",
            worker.display()
        ))
    }
}

/// Replaces this process with [`WORKER_BIN`] and the same arguments.
fn exec_worker_binary() -> ExitCode {
    let exe = match worker_exe() {
        Ok(exe) => exe,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let err = std::process::Command::new(&exe).args(std::env::args_os().skip(1)).exec();
    say!("error: cannot run {}: {err}", exe.display());
    ExitCode::from(EXIT_FAILED)
}

fn load(args: &ConfigArgs) -> Result<LoadedConfig, ExitCode> {
    config::load(&args.file, &args.overrides).map_err(|e| {
        say!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn validate(args: &ConfigArgs) -> ExitCode {
    let loaded = match load(args) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let s = &loaded.spec;
    println!("{}: ok", args.file.display());
    if s.training_role().is_some() {
        print_training(s);
    }
    println!("  roles:");
    for role in &s.roles {
        print_role(s, role);
    }
    let c = &s.cluster;
    if c.multi_host() {
        let tls = match &c.tls {
            Some(files) => format!("your certificate {}", files.cert.display()),
            None => "a CA made at each launch".into(),
        };
        let token = c.token_file.as_ref().map_or(String::new(), |p| p.display().to_string());
        println!(
            "  cluster: {} hosts; the coordinator listens on {} (TLS: {tls}); token in {token}; the training gang's \
             ranks spread over the hosts, the other roles on this one",
            c.hosts, c.bind
        );
    }
    println!("  output: {}", s.run_path.display());
    ExitCode::SUCCESS
}

/// The training role's batch, schedule, checkpoints and program.
fn print_training(s: &config::JobSpec) {
    let workers = if s.min_workers == s.workers {
        s.workers.to_string()
    } else {
        format!("{}–{} (elastic)", s.min_workers, s.workers)
    };
    println!(
        "  {workers} workers; global batch {} = {} × micro_batch {} × grad_accum {} ({} token slots/step)",
        s.global_batch, s.workers, s.micro_batch, s.grad_accum, s.tokens_per_step
    );
    println!(
        "  {} steps, lr {:e} (warm-up {}, cosine to {:e}), device {}, backend {}, precision {}{}",
        s.steps,
        s.optim.lr,
        s.optim.warmup_steps,
        s.optim.min_lr as f32,
        s.device,
        match s.backend {
            config::BackendKind::Shm { or_tcp: true } => "shm (tcp where shared memory is unavailable)",
            other => other.name(),
        },
        s.precision,
        if s.device == config::DeviceKind::Cuda && s.tf32 { ", TF32 matmuls" } else { "" }
    );
    println!(
        "  checkpoints every {} steps (and the last), keep {} newest{}; {} infrastructure and {} training-code restarts",
        s.checkpoint.every,
        s.checkpoint.keep_last,
        if s.checkpoint.keep_best > 0 { format!(" and {} best", s.checkpoint.keep_best) } else { String::new() },
        s.fault.max_restarts,
        s.fault.max_user_restarts
    );
    if let Some(eval) = &s.eval {
        let held_out = match &eval.held_out {
            config::HeldOut::Fraction(f) => format!("the last {:.1}% of the data (held out of training)", f * 100.0),
            config::HeldOut::File(path) => path.display().to_string(),
        };
        println!(
            "  held-out loss every {} steps (and after the last) over {} global batches of {held_out}{}",
            eval.every,
            eval.batches,
            if s.checkpoint.metric == config::MetricChoice::EvalLoss { "; checkpoints ranked by it" } else { "" }
        );
    }
    match (&s.entrypoint, &s.trainer) {
        (Some(cmd), _) => println!("  worker: {}", cmd.join(" ")),
        (None, TrainerKind::Lm) => println!(
            "  worker: built-in GPT (n_layer {}, n_head {}, n_embd {}, n_ctx {})",
            s.model.n_layer, s.model.n_head, s.model.n_embd, s.model.n_ctx
        ),
        (None, TrainerKind::Sft { model, max_len, random_init }) => {
            let from = if *random_init { " from random weights" } else { "" };
            println!("  worker: fine-tuning {}{from} (examples cut to {max_len} tokens)", model.display())
        }
        (None, TrainerKind::Preference(p)) => {
            let what = match p.objective {
                Objective::RewardModel => "reward-model training (Bradley–Terry)".to_string(),
                Objective::Dpo { beta, loss, label_smoothing } => {
                    format!("DPO ({} loss, beta {beta}, label_smoothing {label_smoothing})", loss.as_str())
                }
            };
            let eval = match &p.eval {
                EvalSet::File(path) => format!("held-out pairs from {}", path.display()),
                EvalSet::Fraction(f) => format!("{:.0}% of the pairs held out", f * 100.0),
            };
            println!(
                "  worker: {what} of {} on preference pairs cut to {} tokens; {eval}",
                p.model.display(),
                p.max_len
            )
        }
        (None, TrainerKind::Rl { model, max_len, rl }) => {
            println!(
                "  worker: {:?} post-training of {} ({} prompts × {} samples per step, up to {} new tokens, sequences cut to {max_len}; max_staleness {}, kl_coef {})",
                rl.algorithm,
                model.display(),
                rl.prompts_per_step,
                rl.group_size,
                rl.max_new_tokens,
                rl.max_staleness,
                rl.kl_coef
            );
            println!("  reward: {:?}", rl.reward);
        }
    }
}

/// One role: size, program, resources and restart policy.
fn print_role(s: &config::JobSpec, r: &config::RoleSpec) {
    let size = if r.min_size == r.size { r.size.to_string() } else { format!("{}–{}", r.min_size, r.size) };
    let restart = if r.training {
        format!(
            "gang restart from the last checkpoint (fault.max_restarts = {}, fault.max_user_restarts = {})",
            s.fault.max_restarts, s.fault.max_user_restarts
        )
    } else {
        let how = match r.restart {
            config::RestartMode::Alone => "each process restarts alone",
            config::RestartMode::Gang => "the whole role restarts",
        };
        format!("{how} (max_restarts = {}, backoff {} s)", r.max_restarts, r.backoff.as_secs_f64())
    };
    let program = match (&r.program, &s.trainer) {
        (config::RoleProgram::Worker, TrainerKind::Rl { rl, .. }) => {
            format!("built-in {:?} trainer", rl.algorithm).to_lowercase()
        }
        (config::RoleProgram::Worker, _) => "built-in trainer".into(),
        (other, _) => other.to_string(),
    };
    let gpus = if r.on_training_gpus { "the trainer's GPUs".to_string() } else { format!("{} GPU", r.gpus_per_worker) };
    println!("    {}: {size} × ({} CPU, {gpus}); {restart}; runs: {program}", r.name, r.cpus_per_worker);
}

/// A before/after table of held-out scores (`eval_before` and `eval_after` of `doc`), one row
/// per `(label, key)`; the header names the set and its size (`count_key`).
fn print_eval_table(doc: &serde_json::Value, what: &str, count_key: &str, rows: &[(&str, &str)]) {
    let cell = |which: &str, key: &str| match doc.get(which).and_then(|e| e.get(key)).and_then(|v| v.as_f64()) {
        Some(v) if key == "accuracy" => format!("{:>7.1}%", v * 100.0),
        Some(v) => format!("{v:>8.3}"),
        None => format!("{:>8}", "-"),
    };
    let count =
        doc.get("eval_before").or(doc.get("eval_after")).and_then(|e| e.get(count_key)).and_then(|v| v.as_u64());
    say!("  {what} ({} {count_key}):", count.unwrap_or(0));
    say!("              before    after");
    for (label, key) in rows {
        say!("    {label:<8} {} {}", cell("eval_before", key), cell("eval_after", key));
    }
}

/// What the final model generated (`samples.json`, written by the built-in LM and SFT trainers).
fn print_samples(run: &std::path::Path) {
    let Some(samples) = std::fs::read(run.join("samples.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<serde_json::Value>>(&b).ok())
    else {
        return;
    };
    let field = |s: &serde_json::Value, k: &str| s.get(k).and_then(|v| v.as_str()).map(|t| t.trim().to_string());
    say!("  the final model's greedy output:");
    for s in &samples {
        let (Some(prompt), Some(response)) = (field(s, "prompt"), field(s, "response")) else { continue };
        let taught = field(s, "expected").map(|e| format!(" (taught {e:?})")).unwrap_or_default();
        say!("    {prompt:?} -> {response:?}{taught}");
    }
}

/// `rtrain launch`: `program` says what each worker runs.
pub fn launch_command(
    args: &LaunchArgs,
    started: Instant,
    program: impl Fn(&LoadedConfig) -> Result<WorkerProgram, String>,
) -> ExitCode {
    init_driver_logging();
    let loaded = match load(&args.config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let program = match program(&loaded) {
        Ok(p) => p,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let slurm = match crate::slurm::allocation() {
        Ok(alloc) => alloc,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let opts = LaunchOptions { fresh: args.fresh, started, program, builtin_exe: worker_exe().ok(), slurm };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let report = match runtime.block_on(launch(&loaded, &opts)) {
        Ok(r) => r,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let s = &report.summary;
    if let Some(e) = &report.summary_error {
        say!("warning: summary.json not written: {e}");
    }
    match report.outcome {
        Outcome::Finished => {
            let loss = s.final_loss.map(|l| format!(", loss {l:.4}")).unwrap_or_default();
            let speed = s.tokens_per_s.map(|t| format!(", {t:.0} tokens/s")).unwrap_or_default();
            say!("{} finished: {} steps{loss}{speed} in {:.1} s", s.name, s.final_step, s.wall_time_s);
            say!("  run directory: {} (metrics.jsonl, summary.json, logs/)", report.run_path.display());
            if let Some(rl) = &s.rl {
                let rows = [("accuracy", "accuracy"), ("reward", "reward")];
                print_eval_table(rl, "held-out evaluation, greedy", "prompts", &rows);
            }
            print_samples(&report.run_path);
            if let Some(preference) = &s.preference {
                let rows = [("accuracy", "accuracy"), ("margin", "margin"), ("loss", "loss")];
                print_eval_table(preference, "held-out preference pairs", "pairs", &rows);
            }
            ExitCode::SUCCESS
        }
        Outcome::Failed(summary) => {
            say_part!("error: {summary}");
            say!("  run directory: {}", report.run_path.display());
            ExitCode::from(EXIT_FAILED)
        }
        Outcome::Interrupted { signal } => {
            let resume = match crate::checkpoint::list(&report.run_path).ok().and_then(|mut all| all.pop()) {
                Some(c) => format!("the next launch resumes from its newest checkpoint (step {})", c.step),
                None => "no checkpoint was saved: the next launch starts over".into(),
            };
            say!("{} interrupted at step {}; all workers stopped; {resume}", s.name, s.final_step);
            ExitCode::from(128 + signal as u8)
        }
    }
}

fn init_driver_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RTRAIN_LOG").unwrap_or_else(|_| "warn".into());
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
