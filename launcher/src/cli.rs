//! The `rtrain` command line. `main.rs` only calls [`main`]; tests call the same functions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use rtrain_trainer::builtin::BuiltIn;
use rtrain_trainer::config::{self, LoadedConfig, TrainerKind};
use rtrain_trainer::runtime::{WorkerEnv, run_worker};
use rtrain_trainer::train_loop::{TrainContext, TrainError, TrainLoop};

use crate::bench::{self, BenchCommand};
use crate::ckpt::{self, CkptCommand};
use crate::infer::{self, GenerateArgs, ScoreArgs};
use crate::launch::{LaunchOptions, Outcome, WorkerProgram, launch};

/// Exit code for a config or usage error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a launch that failed.
pub const EXIT_FAILED: u8 = 1;

#[derive(Parser, Debug)]
#[command(name = "rtrain", version, about = "Distributed training orchestrator: gang-scheduled data-parallel training")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
    /// Run as a built-in worker (started by `rtrain launch`, not by hand).
    #[command(hide = true)]
    Worker,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// The job config (TOML).
    pub file: PathBuf,
    /// Override a key by its dotted path, e.g. `--set train.workers=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start over when the run directory already holds a run (the old one is moved aside).
    #[arg(long)]
    pub fresh: bool,
}

/// The `rtrain` binary.
pub fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Launch(args) => {
            let program = |loaded: &LoadedConfig| match &loaded.spec.entrypoint {
                Some(cmd) => WorkerProgram::External(cmd.clone()),
                None => WorkerProgram::Runtime(vec![self_exe(), "worker".into()]),
            };
            launch_command(&args, started, program)
        }
        Command::Bench(cmd) => bench::run(cmd),
        Command::Ckpt(cmd) => ckpt::run(cmd),
        Command::Generate(args) => infer::generate_command(&args),
        Command::Score(args) => infer::score_command(&args),
        Command::Worker => run_worker(BuiltIn::new),
    }
}

/// Entry point for a user's binary with a custom [`TrainLoop`]: started by hand it acts as
/// `rtrain launch FILE [--set ...] [--fresh]` with itself as the worker program; started by
/// the launcher it runs `build`'s loop as one rank.
pub fn run_with_loop<L, F>(build: F) -> ExitCode
where
    L: TrainLoop,
    F: FnOnce(&mut TrainContext) -> Result<L, TrainError>,
{
    if WorkerEnv::is_worker_process() {
        return run_worker(build);
    }
    #[derive(Parser)]
    struct LoopCli {
        #[command(flatten)]
        launch: LaunchArgs,
    }
    let started = Instant::now();
    let args = LoopCli::parse();
    launch_command(&args.launch, started, |_| WorkerProgram::Runtime(vec![self_exe()]))
}

fn self_exe() -> String {
    std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "rtrain".into())
}

fn load(args: &ConfigArgs) -> Result<LoadedConfig, ExitCode> {
    config::load(&args.file, &args.overrides).map_err(|e| {
        eprintln!("error: {e}");
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
        "  {} steps, lr {:e} (warm-up {}, cosine to {:e}), device {:?}, backend {}",
        s.steps,
        s.optim.lr,
        s.optim.warmup_steps,
        s.optim.min_lr as f32,
        s.device,
        s.backend.name()
    );
    println!(
        "  checkpoints every {} steps (and the last), keep {} newest{}; {} infrastructure and {} training-code restarts",
        s.checkpoint.every,
        s.checkpoint.keep_last,
        if s.checkpoint.keep_best > 0 { format!(" and {} best", s.checkpoint.keep_best) } else { String::new() },
        s.fault.max_restarts,
        s.fault.max_user_restarts
    );
    match (&s.entrypoint, &s.trainer) {
        (Some(cmd), _) => println!("  worker: {}", cmd.join(" ")),
        (None, TrainerKind::Lm) => println!(
            "  worker: built-in GPT (n_layer {}, n_head {}, n_embd {}, n_ctx {})",
            s.model.n_layer, s.model.n_head, s.model.n_embd, s.model.n_ctx
        ),
        (None, TrainerKind::Sft { model, max_len }) => {
            println!("  worker: fine-tuning {} (examples cut to {max_len} tokens)", model.display())
        }
    }
    println!("  output: {}", s.run_path.display());
    ExitCode::SUCCESS
}

fn launch_command(args: &LaunchArgs, started: Instant, program: impl Fn(&LoadedConfig) -> WorkerProgram) -> ExitCode {
    init_driver_logging();
    let loaded = match load(&args.config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let opts = LaunchOptions { fresh: args.fresh, started, program: program(&loaded) };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let report = match runtime.block_on(launch(&loaded, &opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}: {e}", args.config.file.display());
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let s = &report.summary;
    match report.outcome {
        Outcome::Finished => {
            let loss = s.final_loss.map(|l| format!(", loss {l:.4}")).unwrap_or_default();
            let speed = s.tokens_per_s.map(|t| format!(", {t:.0} tokens/s")).unwrap_or_default();
            eprintln!("{} finished: {} steps{loss}{speed} in {:.1} s", s.name, s.final_step, s.wall_time_s);
            eprintln!("  run directory: {} (metrics.jsonl, summary.json, logs/)", report.run_path.display());
            ExitCode::SUCCESS
        }
        Outcome::Failed(summary) => {
            eprint!("error: {summary}");
            eprintln!("  run directory: {}", report.run_path.display());
            ExitCode::from(EXIT_FAILED)
        }
        Outcome::Interrupted { signal } => {
            eprintln!("{} interrupted at step {}; all workers stopped", s.name, s.final_step);
            ExitCode::from(128 + signal as u8)
        }
    }
}

fn init_driver_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RTRAIN_LOG").unwrap_or_else(|_| "warn".into());
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
