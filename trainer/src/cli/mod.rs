//! The `rtrain-worker` binary (the commands of `rtrain` that need libtorch, which `rtrain`
//! executes), and [`run_with_step`] / [`run_with_loop`], the entry points of a user's own
//! training binary.

mod bench;
mod gpt_generate;
mod infer;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use rtrain_launcher::bench::BenchCommand;
use rtrain_launcher::cli::{Cli, Command, EXIT_CONFIG, LaunchArgs, launch_command};
use rtrain_launcher::launch::WorkerProgram;

use crate::builtin::{BuiltIn, Extensions};
use crate::engine::{StepLoop, TrainStep};
use crate::runtime::{WorkerEnv, run_worker};
use crate::train_loop::{TrainContext, TrainError, TrainLoop};

/// The `rtrain-worker` binary without the trainers and programs of other crates.
pub fn main() -> ExitCode {
    main_with(Extensions::none())
}

/// The `rtrain-worker` binary: `rtrain`'s command line, for the commands that need libtorch,
/// with the trainers and role programs of crates built on this one.
pub fn main_with(extensions: Extensions) -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Worker | Command::Role { .. }) {
        rtrain_launcher::cli::end_quietly_when_the_reader_goes();
    }
    match cli.command {
        Command::Worker => run_worker(|ctx| BuiltIn::new(ctx, extensions)),
        Command::Role { name } => match (extensions.role)(&name) {
            Some(code) => code,
            None => {
                eprintln!("error: `{name}` is not a built-in role program of this rtrain-worker");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Generate(args) => infer::generate_command(&args),
        Command::Score(args) => infer::score_command(&args),
        Command::Bench(BenchCommand::Allreduce { ranks, hosts, netns, backend, max_mib, iters, json }) => {
            bench::allreduce_command(ranks, hosts, &netns, &backend, max_mib, iters, json)
        }
        Command::Bench(BenchCommand::Generate { model, batch, prompt_len, new_tokens, repeats, group_size, json }) => {
            bench::generate_command(&model, &batch, prompt_len, new_tokens, repeats, group_size, json)
        }
        _ => {
            eprintln!(
                "error: rtrain-worker runs the commands of `rtrain` that need libtorch; run this one with `rtrain`"
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Entry point for a user's binary that supplies a model and its loss (a [`TrainStep`]) and
/// lets the engine do DDP, accumulation, optimization and checkpoints; see [`run_with_loop`].
pub fn run_with_step<S, F>(build: F) -> ExitCode
where
    S: TrainStep,
    F: FnOnce(&mut TrainContext) -> Result<S, TrainError>,
{
    run_with_loop(|ctx| {
        let train_step = build(ctx)?;
        StepLoop::new(ctx, train_step)
    })
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
    launch_command(&args.launch, started, |_| {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
        Ok(WorkerProgram::Runtime(vec![exe.display().to_string()]))
    })
}
