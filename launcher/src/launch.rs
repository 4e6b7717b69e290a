//! The driver of one job: schedule the trainer gang, start the coordinator and the workers,
//! supervise them until they finish, fail or are interrupted, and write the run's outputs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rtrain_trainer::config::{DeviceKind, LoadedConfig};
use rtrain_trainer::proto::{FailureReport, StepMetrics};
use rtrain_trainer::runtime::{unix_now, vars};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::agent::{Agent, ExitKind, WorkerExit, WorkerLaunch, log_tail};
use crate::coordinator::{CoordinatorEvent, start_coordinator};
use crate::failure::{FailureSummary, RankFailure};
use crate::progress::RunProgress;
use crate::run_dir::{RunDir, RunDirError};
use crate::scheduler::{GangRequest, NodeResources, RankPlacement, ScheduleError, place_gang};

/// Time workers get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
const ROLE: &str = "trainer";

/// What the workers run.
#[derive(Debug, Clone)]
pub enum WorkerProgram {
    /// A program built on the rtrain runtime (the built-in `rtrain worker` or a binary calling
    /// `run_worker`): it registers with the coordinator and reports steps.
    Runtime(Vec<String>),
    /// Any other command (a torchrun-style script): supervised, but it reports nothing.
    External(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Move an earlier run in the same directory aside instead of refusing.
    pub fresh: bool,
    /// When the launch began (process start), for the start-up timings.
    pub started: Instant,
    pub program: WorkerProgram,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("cannot schedule the trainer gang: {0}")]
    Schedule(#[from] ScheduleError),
    #[error("cannot start the coordinator: {0}")]
    Coordinator(std::io::Error),
    #[error("cannot start workers: {0}")]
    Spawn(#[from] crate::agent::SpawnError),
}

/// How a launch ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Finished,
    Failed(FailureSummary),
    Interrupted { signal: i32 },
}

/// Seconds spent in each start-up phase, measured from the previous one.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartupPhases {
    pub schedule_s: f64,
    pub spawn_s: f64,
    pub rendezvous_s: Option<f64>,
    pub first_step_s: Option<f64>,
    /// Launch start → first optimizer step done.
    pub launch_to_first_step_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub workers: usize,
    pub cause: Option<String>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub status: &'static str,
    pub final_step: u64,
    pub final_loss: Option<f64>,
    pub wall_time_s: f64,
    /// Steady-state throughput: tokens of steps 2..=N over the time between step 1 and step N.
    pub tokens_per_s: Option<f64>,
    pub first_step_done_unix: Option<f64>,
    pub workers: usize,
    pub global_batch: usize,
    pub startup: StartupPhases,
    pub attempts: Vec<AttemptRecord>,
    pub failure: Option<FailureSummary>,
}

pub struct LaunchReport {
    pub outcome: Outcome,
    pub summary: RunSummary,
    pub run_path: PathBuf,
}

/// Runs the job described by `loaded` to its end.
pub async fn launch(loaded: &LoadedConfig, opts: &LaunchOptions) -> Result<LaunchReport, LaunchError> {
    let spec = &loaded.spec;
    let mut run = RunDir::create(&spec.run_path, &loaded.config, opts.fresh)?;
    let progress = RunProgress::new(spec.steps);

    progress.set_phase("scheduling");
    let gpus_per_worker = usize::from(spec.device == DeviceKind::Cuda);
    let request = GangRequest { workers: spec.workers, cpus_per_worker: spec.cpus_per_worker, gpus_per_worker };
    let placement = place_gang(request, NodeResources::local())?;
    let mut startup = StartupPhases { schedule_s: opts.started.elapsed().as_secs_f64(), ..Default::default() };
    let mut phase_start = Instant::now();

    let token = job_token();
    let (coordinator, mut events) = start_coordinator(SocketAddr::from(([127, 0, 0, 1], 0)), token.clone())
        .await
        .map_err(LaunchError::Coordinator)?;
    let attempt = 0u32;
    coordinator.begin_attempt(attempt, spec.workers);
    let logs = run.attempt_logs(attempt)?;
    let master_port = free_port().map_err(LaunchError::Coordinator)?;

    progress.set_phase("spawning");
    let (mut agent, mut exits) = Agent::new();
    let (command, reports) = match &opts.program {
        WorkerProgram::Runtime(cmd) => (cmd.clone(), true),
        WorkerProgram::External(cmd) => (cmd.clone(), false),
    };
    let common = WorkerCommon {
        coordinator: coordinator.addr.to_string(),
        token,
        config: run.config_path(),
        run_id: spec.name.clone(),
        master_port,
        attempt,
        world_size: spec.workers,
        device: spec.device,
    };
    for p in &placement {
        let launch = WorkerLaunch {
            rank: p.rank,
            command: command.clone(),
            env: worker_env(&common, p, &placement),
            log_path: logs.join(format!("{ROLE}-{}.log", p.rank)),
        };
        if let Err(e) = agent.spawn(launch) {
            agent.stop_all(STOP_GRACE, &mut exits).await;
            coordinator.shutdown();
            return Err(e.into());
        }
    }
    startup.spawn_s = phase_start.elapsed().as_secs_f64();
    phase_start = Instant::now();
    progress.set_phase(if reports { "rendezvous" } else { "running" });
    tracing::info!(workers = spec.workers, logs = %logs.display(), "workers started");

    let mut sigint = signal(SignalKind::interrupt()).map_err(LaunchError::Coordinator)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(LaunchError::Coordinator)?;
    let rendezvous_deadline = tokio::time::Instant::now() + spec.rendezvous_timeout;
    let mut gang_complete = !reports;
    let mut reported: Vec<FailureReport> = Vec::new();
    let mut last_step: Option<(u64, f64, f64)> = None; // (step, loss, time)
    let mut first_step: Option<(u64, f64)> = None; // (step, time)
    let mut finished = 0usize;

    let ending = loop {
        tokio::select! {
            Some(event) = events.recv() => match event {
                CoordinatorEvent::Registered { rank } => tracing::debug!(rank, "registered"),
                CoordinatorEvent::GangComplete => {
                    gang_complete = true;
                    startup.rendezvous_s = Some(phase_start.elapsed().as_secs_f64());
                    phase_start = Instant::now();
                    progress.set_phase("training");
                }
                CoordinatorEvent::Step(m) => {
                    if first_step.is_none() {
                        first_step = Some((m.step, m.time));
                        startup.first_step_s = Some(phase_start.elapsed().as_secs_f64());
                        startup.launch_to_first_step_s = Some(opts.started.elapsed().as_secs_f64());
                    }
                    record_step(&mut run, &progress, &m, attempt, &mut last_step);
                }
                CoordinatorEvent::Failure(report) => reported.push(report),
            },
            Some(exit) = exits.recv() => {
                agent.reaped(exit.rank);
                if exit.kind.success() {
                    finished += 1;
                    if finished == spec.workers {
                        break Ending::Finished;
                    }
                    continue;
                }
                let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                break Ending::WorkerFailed { first: exit, stopped };
            },
            _ = tokio::time::sleep_until(rendezvous_deadline), if !gang_complete => {
                let missing = coordinator.missing_ranks();
                let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                break Ending::RendezvousTimeout { missing, stopped };
            },
            _ = sigint.recv() => {
                progress.println("interrupted: stopping workers");
                agent.stop_all(STOP_GRACE, &mut exits).await;
                break Ending::Interrupted { signal: libc::SIGINT };
            },
            _ = sigterm.recv() => {
                progress.println("terminated: stopping workers");
                agent.stop_all(STOP_GRACE, &mut exits).await;
                break Ending::Interrupted { signal: libc::SIGTERM };
            },
        }
    };
    // Steps and error reports sent right before the workers exited.
    while let Ok(event) = events.try_recv() {
        match event {
            CoordinatorEvent::Step(m) => {
                first_step.get_or_insert((m.step, m.time));
                record_step(&mut run, &progress, &m, attempt, &mut last_step);
            }
            CoordinatorEvent::Failure(report) => reported.push(report),
            _ => {}
        }
    }
    let outcome = match ending {
        Ending::Finished => Outcome::Finished,
        Ending::Interrupted { signal } => Outcome::Interrupted { signal },
        Ending::WorkerFailed { first, stopped } => {
            Outcome::Failed(failure_summary(&spec.name, attempt, first, &stopped, &reported, &logs))
        }
        Ending::RendezvousTimeout { missing, stopped } => {
            let mut summary = FailureSummary::new(
                &spec.name,
                attempt,
                format!(
                    "rendezvous timed out after {:.0} s: rank(s) {:?} never registered (see rendezvous.timeout_s)",
                    spec.rendezvous_timeout.as_secs_f64(),
                    missing
                ),
            );
            summary.stopped = stopped.iter().map(|e| format!("{ROLE}:{} {}", e.rank, e.kind)).collect();
            Outcome::Failed(summary)
        }
    };
    progress.finish();
    coordinator.shutdown();

    let tokens_per_s = match (first_step, last_step) {
        (Some((s0, t0)), Some((s1, _, t1))) if s1 > s0 && t1 > t0 => {
            Some((s1 - s0) as f64 * spec.tokens_per_step as f64 / (t1 - t0))
        }
        _ => None,
    };
    let failure = match &outcome {
        Outcome::Failed(f) => Some(f.clone()),
        _ => None,
    };
    let summary = RunSummary {
        name: spec.name.clone(),
        status: match outcome {
            Outcome::Finished => "finished",
            Outcome::Failed(_) => "failed",
            Outcome::Interrupted { .. } => "interrupted",
        },
        final_step: last_step.map(|s| s.0).unwrap_or(0),
        final_loss: last_step.map(|s| s.1),
        wall_time_s: opts.started.elapsed().as_secs_f64(),
        tokens_per_s,
        first_step_done_unix: first_step.map(|s| s.1),
        workers: spec.workers,
        global_batch: spec.global_batch,
        startup,
        attempts: vec![AttemptRecord {
            number: attempt,
            workers: spec.workers,
            cause: failure.as_ref().map(|f| f.root_cause.clone()),
        }],
        failure,
    };
    run.write_summary(&summary)?;
    Ok(LaunchReport { outcome, summary, run_path: run.path.clone() })
}

/// How the supervision loop ended, before the outputs are written.
enum Ending {
    Finished,
    Interrupted { signal: i32 },
    WorkerFailed { first: WorkerExit, stopped: Vec<WorkerExit> },
    RendezvousTimeout { missing: Vec<u32>, stopped: Vec<WorkerExit> },
}

fn record_step(run: &mut RunDir, progress: &RunProgress, m: &StepMetrics, attempt: u32, last: &mut Option<(u64, f64, f64)>) {
    *last = Some((m.step, m.loss, m.time));
    progress.on_step(m);
    if let Err(e) = run.record_step(m, attempt) {
        progress.println(&format!("warning: {e}"));
    }
}

fn failure_summary(
    job: &str,
    attempt: u32,
    first: WorkerExit,
    stopped: &[WorkerExit],
    reported: &[FailureReport],
    logs: &std::path::Path,
) -> FailureSummary {
    let log_path = logs.join(format!("{ROLE}-{}.log", first.rank));
    let error = reported.iter().find(|r| r.id.as_ref().is_some_and(|id| id.rank as usize == first.rank));
    let mut summary = FailureSummary::new(job, attempt, format!("{ROLE}:{} {}", first.rank, describe(first.kind)));
    summary.failed = Some(RankFailure {
        rank: first.rank,
        exit: first.kind.to_string(),
        error: error.map(|e| e.message.clone()),
        backtrace: error.map(|e| e.backtrace.clone()).filter(|b| !b.is_empty()),
        log_path: log_path.clone(),
        log_tail: log_tail(&log_path, 15),
    });
    summary.stopped = stopped.iter().map(|e| format!("{ROLE}:{} {}", e.rank, e.kind)).collect();
    summary
}

fn describe(kind: ExitKind) -> String {
    match kind {
        ExitKind::Code(_) => format!("exited with {kind}"),
        ExitKind::Signal(_) => format!("was killed by {kind}"),
    }
}

struct WorkerCommon {
    coordinator: String,
    token: String,
    config: PathBuf,
    run_id: String,
    master_port: u16,
    attempt: u32,
    world_size: usize,
    device: DeviceKind,
}

/// The torchrun environment plus rtrain's own (DESIGN.md, worker contract).
fn worker_env(c: &WorkerCommon, p: &RankPlacement, all: &[RankPlacement]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("RANK", p.rank.to_string()),
        ("LOCAL_RANK", p.local_rank.to_string()),
        ("WORLD_SIZE", c.world_size.to_string()),
        ("LOCAL_WORLD_SIZE", all.len().to_string()),
        ("GROUP_RANK", "0".into()),
        ("NODE_RANK", "0".into()),
        ("ROLE_NAME", ROLE.into()),
        ("ROLE_RANK", p.rank.to_string()),
        ("ROLE_WORLD_SIZE", c.world_size.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", c.master_port.to_string()),
        ("TORCHELASTIC_RESTART_COUNT", c.attempt.to_string()),
        ("TORCHELASTIC_MAX_RESTARTS", "0".into()),
        ("TORCHELASTIC_RUN_ID", c.run_id.clone()),
        (vars::COORDINATOR, c.coordinator.clone()),
        (vars::JOB_TOKEN, c.token.clone()),
        (vars::ROLE, ROLE.into()),
        (vars::ATTEMPT, c.attempt.to_string()),
        (vars::CONFIG, c.config.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        env.push(("OMP_NUM_THREADS".into(), p.threads.to_string()));
    }
    if c.device == DeviceKind::Cuda {
        let mut gpus: Vec<usize> = all.iter().flat_map(|q| q.gpus.iter().copied()).collect();
        gpus.sort_unstable();
        let list: Vec<String> = gpus.iter().map(|g| g.to_string()).collect();
        env.push(("CUDA_VISIBLE_DEVICES".into(), list.join(",")));
    }
    env
}

/// A random 128-bit token, hex-encoded.
fn job_token() -> String {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).is_err() {
        // No /dev/urandom: fall back to time and pid, still unguessable across jobs in practice.
        let seed = unix_now().to_bits() ^ (std::process::id() as u64) << 32;
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A port free right now on loopback, for MASTER_PORT (torchrun scripts host their store there).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
