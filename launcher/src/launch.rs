//! The driver of one job: schedule the trainer gang, start the coordinator and the workers,
//! supervise them until they finish, fail or are interrupted, and write the run's outputs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkpoint::model_keys;
use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::config::{DeviceKind, LoadedConfig};
use crate::contract::unix_now;
use crate::proto::{FailureReport, StepMetrics};
use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::agent::{Agent, ExitKind, WorkerExit, WorkerLaunch, log_tail};
use crate::coordinator::{CoordinatorEvent, CoordinatorHandle, start_coordinator};
use crate::failure::{FailureSummary, RankFailure};
use crate::progress::RunProgress;
use crate::run_dir::{RunDir, RunDirError};
use crate::scheduler::{GangRequest, NodeResources, RankPlacement, ScheduleError, elastic_size, place_gang};
use crate::worker_env::{WorkerCommon, allowed_cpus, free_port, job_token, pinned_cpus, worker_env};

/// Time workers get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// After a first worker failure, how long to wait for the others' exits before choosing the
/// root cause: a rank killed by a signal takes its peers down with it within milliseconds, and
/// the killed rank, not a peer that lost its connection, is the cause.
const SETTLE: Duration = Duration::from_millis(50);
/// How often heartbeats are checked for hung workers.
const HEALTH_TICK: Duration = Duration::from_millis(250);
pub(crate) const ROLE: &str = "trainer";

/// What the workers run.
#[derive(Debug, Clone)]
pub enum WorkerProgram {
    /// A program built on the rtrain runtime (the built-in `rtrain-worker worker` or a binary calling
    /// `run_worker`): it registers with the coordinator and reports steps.
    Runtime(Vec<String>),
    /// Any other command (a torchrun-style script): supervised, but it reports nothing.
    External(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Move an earlier run in the same directory aside instead of continuing or refusing.
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
    #[error("cannot resume: {0}")]
    Resume(String),
}

/// How a launch ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Finished,
    Failed(FailureSummary),
    Interrupted { signal: i32 },
}

/// Seconds spent in each start-up phase of the first attempt, measured from the previous one.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartupPhases {
    pub schedule_s: f64,
    pub spawn_s: f64,
    pub rendezvous_s: Option<f64>,
    pub first_step_s: Option<f64>,
    /// Launch start → first optimizer step done.
    pub launch_to_first_step_s: Option<f64>,
}

/// Which restart budget a failure counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// A worker killed by a signal, hung, or lost: the machine's or the platform's doing.
    Infrastructure,
    /// The training code failed: an error, a panic, a non-zero exit.
    User,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub workers: usize,
    /// The checkpoint step the attempt started from.
    pub resumed_from_step: Option<u64>,
    /// Why the attempt ended, if it failed.
    pub cause: Option<String>,
    pub class: Option<FailureClass>,
    /// Failure detected → first optimizer step of the next attempt done.
    pub recovery_s: Option<f64>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub status: &'static str,
    pub final_step: u64,
    pub final_loss: Option<f64>,
    pub wall_time_s: f64,
    /// Steady-state throughput of the last attempt: the tokens its workers reported for the
    /// steps after its first, over the time between its first and last step.
    pub tokens_per_s: Option<f64>,
    pub first_step_done_unix: Option<f64>,
    /// Workers of the last attempt.
    pub workers: usize,
    pub global_batch: usize,
    pub startup: StartupPhases,
    pub restarts: u32,
    pub attempts: Vec<AttemptRecord>,
    pub failure: Option<FailureSummary>,
}

pub struct LaunchReport {
    pub outcome: Outcome,
    pub summary: RunSummary,
    pub run_path: PathBuf,
}

/// Progress over the whole launch, across attempts.
#[derive(Default)]
struct Progressed {
    last_step: Option<(u64, f64, f64)>, // (step, loss, time)
    first_step_done_unix: Option<f64>,
    /// First step (step, time) of the current attempt, for its throughput.
    attempt_first: Option<(u64, f64)>,
    /// Tokens the workers reported for the steps of the current attempt after its first.
    attempt_tokens: f64,
}

/// Restarts used, per budget.
#[derive(Default)]
struct Restarts {
    infrastructure: u32,
    user: u32,
}

impl Restarts {
    fn total(&self) -> u32 {
        self.infrastructure + self.user
    }
}

/// Everything an attempt needs from the launch around it.
struct Launch<'a> {
    loaded: &'a LoadedConfig,
    opts: &'a LaunchOptions,
    run: RunDir,
    progress: RunProgress,
    coordinator: CoordinatorHandle,
    events: mpsc::UnboundedReceiver<CoordinatorEvent>,
    sigint: Signal,
    sigterm: Signal,
    token: String,
    startup: StartupPhases,
    progressed: Progressed,
    restarts: Restarts,
    attempts: Vec<AttemptRecord>,
    /// When the failure that ended the previous attempt was detected.
    recovering_since: Option<Instant>,
}

/// How one attempt ended.
enum AttemptEnd {
    Finished,
    Interrupted { signal: i32 },
    Failed { summary: FailureSummary, class: FailureClass, detected: Instant },
}

/// Runs the job described by `loaded` to its end, restarting failed attempts within the
/// restart budgets.
pub async fn launch(loaded: &LoadedConfig, opts: &LaunchOptions) -> Result<LaunchReport, LaunchError> {
    let spec = &loaded.spec;
    let run = RunDir::open(&spec.run_path, &loaded.config, opts.fresh)?;
    let progress = RunProgress::new(spec.steps);
    let token = job_token();
    let (coordinator, events) = start_coordinator(SocketAddr::from(([127, 0, 0, 1], 0)), token.clone())
        .await
        .map_err(LaunchError::Coordinator)?;
    let mut l = Launch {
        loaded,
        opts,
        run,
        progress,
        coordinator,
        events,
        sigint: signal(SignalKind::interrupt()).map_err(LaunchError::Coordinator)?,
        sigterm: signal(SignalKind::terminate()).map_err(LaunchError::Coordinator)?,
        token,
        startup: StartupPhases::default(),
        progressed: Progressed::default(),
        restarts: Restarts::default(),
        attempts: Vec::new(),
        recovering_since: None,
    };
    let result = l.supervise().await;
    l.progress.finish();
    let Launch { run, coordinator, startup, progressed, restarts, attempts, .. } = l;
    coordinator.shutdown();
    let (outcome, workers, global_batch) = result?;

    let tokens_per_s = match (progressed.attempt_first, progressed.last_step) {
        (Some((s0, t0)), Some((s1, _, t1))) if s1 > s0 && t1 > t0 => Some(progressed.attempt_tokens / (t1 - t0)),
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
        final_step: progressed.last_step.map(|s| s.0).unwrap_or(0),
        final_loss: progressed.last_step.map(|s| s.1),
        wall_time_s: opts.started.elapsed().as_secs_f64(),
        tokens_per_s,
        first_step_done_unix: progressed.first_step_done_unix,
        workers,
        global_batch,
        startup,
        restarts: restarts.total(),
        attempts,
        failure,
    };
    run.write_summary(&summary)?;
    Ok(LaunchReport { outcome, summary, run_path: run.path.clone() })
}

impl Launch<'_> {
    /// Runs attempts until one finishes, the launch is interrupted, or a budget is spent.
    /// Returns the outcome, the last attempt's gang size and its global batch.
    async fn supervise(&mut self) -> Result<(Outcome, usize, usize), LaunchError> {
        let spec = &self.loaded.spec;
        let mut attempt = self.run.next_attempt();
        let mut workers = spec.workers;
        let mut global_batch = spec.global_batch;
        // Consecutive failed attempts that did not complete a step.
        let mut streak = 0u32;
        loop {
            self.progress.set_phase("scheduling");
            let resume = self.pick_checkpoint()?;
            if let Some((_, state)) = &resume {
                global_batch = state.global_batch;
                self.progress.set_position(state.step);
                if state.step >= spec.steps {
                    self.progress.println(&format!(
                        "{} is already complete at step {} of train.steps = {}; nothing to run (pass --fresh to train again)",
                        spec.name,
                        state.step,
                        spec.steps
                    ));
                    let done = state.metric.unwrap_or(f64::NAN);
                    self.progressed.last_step = Some((state.step, done, unix_now()));
                    return Ok((Outcome::Finished, state.world_size, global_batch));
                }
            }
            let gpus_per_worker = usize::from(spec.device == DeviceKind::Cuda);
            let node = NodeResources::local();
            let placement =
                match elastic_size(spec.min_workers, spec.workers, spec.cpus_per_worker, gpus_per_worker, node)
                    .and_then(|n| {
                        place_gang(
                            GangRequest { workers: n, cpus_per_worker: spec.cpus_per_worker, gpus_per_worker },
                            node,
                        )
                    }) {
                    Ok(p) => p,
                    // The first attempt cannot start: a plain error, nothing was run.
                    Err(e) if self.attempts.is_empty() => return Err(e.into()),
                    Err(e) => {
                        let mut summary = FailureSummary::new(
                            &spec.name,
                            attempt,
                            format!("cannot place the gang for a restart: {e}"),
                        );
                        summary.previous_attempts = self.previous_causes();
                        return Ok((Outcome::Failed(summary), workers, global_batch));
                    }
                };
            if placement.len() != workers && !self.attempts.is_empty() {
                self.progress.println(&format!(
                    "continuing with {} workers (was {workers}); global batch {global_batch} kept",
                    placement.len()
                ));
            }
            workers = placement.len();
            if self.attempts.is_empty() {
                self.startup.schedule_s = self.opts.started.elapsed().as_secs_f64();
            }
            self.attempts.push(AttemptRecord {
                number: attempt,
                workers,
                resumed_from_step: resume.as_ref().map(|(_, s)| s.step),
                cause: None,
                class: None,
                recovery_s: None,
            });
            let resume_path = resume.map(|(c, _)| c.path);
            let end = self.run_attempt(attempt, &placement, resume_path.as_deref(), global_batch).await?;
            let (summary, class, detected) = match end {
                AttemptEnd::Finished => return Ok((Outcome::Finished, workers, global_batch)),
                AttemptEnd::Interrupted { signal } => {
                    return Ok((Outcome::Interrupted { signal }, workers, global_batch));
                }
                AttemptEnd::Failed { summary, class, detected } => (summary, class, detected),
            };
            if let Some(record) = self.attempts.last_mut() {
                record.cause = Some(summary.root_cause.clone());
                record.class = Some(class);
            }
            let f = &spec.fault;
            let previous = self.previous_causes();
            let previous = previous[..previous.len().saturating_sub(1)].to_vec();
            let (used, budget, key) = match class {
                FailureClass::Infrastructure => {
                    (&mut self.restarts.infrastructure, f.max_restarts, "fault.max_restarts")
                }
                FailureClass::User => (&mut self.restarts.user, f.max_user_restarts, "fault.max_user_restarts"),
            };
            if *used >= budget {
                let mut summary = summary;
                summary.previous_attempts = previous;
                summary.budget = Some(format!(
                    "no restart left: {used} of {key} = {budget} used ({} failure)",
                    match class {
                        FailureClass::Infrastructure => "infrastructure",
                        FailureClass::User => "training code",
                    }
                ));
                return Ok((Outcome::Failed(summary), workers, global_batch));
            }
            *used += 1;
            // Back off exponentially over consecutive failures; an attempt that trained resets it.
            streak = if self.progressed.attempt_first.is_some() { 1 } else { streak + 1 };
            let delay = f.backoff_before(streak);
            self.progress.println(&format!(
                "attempt {attempt} failed: {}; restarting in {:.2} s (restart {} of {key} = {budget})",
                summary.root_cause,
                delay.as_secs_f64(),
                match class {
                    FailureClass::Infrastructure => self.restarts.infrastructure,
                    FailureClass::User => self.restarts.user,
                },
            ));
            self.recovering_since = Some(detected);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.sigint.recv() => return Ok((Outcome::Interrupted { signal: libc::SIGINT }, workers, global_batch)),
                _ = self.sigterm.recv() => return Ok((Outcome::Interrupted { signal: libc::SIGTERM }, workers, global_batch)),
            }
            attempt += 1;
        }
    }

    /// The newest checkpoint that verifies (saying which newer ones were skipped and why), with
    /// its trainer state; a checkpoint of a different model architecture is refused.
    fn pick_checkpoint(&mut self) -> Result<Option<(Checkpoint, TrainerState)>, LaunchError> {
        if matches!(self.opts.program, WorkerProgram::External(_)) {
            return Ok(None);
        }
        let run_path = &self.run.path;
        remove_unfinished_writes(run_path);
        let scan = checkpoint::newest_valid(run_path).map_err(|e| LaunchError::Resume(e.to_string()))?;
        for (ckpt, why) in &scan.skipped {
            self.progress.println(&format!("warning: skipping checkpoint {}: {why}", ckpt.path.display()));
        }
        let Some((ckpt, checkpoint::Verified { state, .. })) = scan.newest else {
            if !scan.skipped.is_empty() {
                self.progress.println("warning: no valid checkpoint left; starting from step 0");
            }
            return Ok(None);
        };
        let spec = &self.loaded.spec;
        let want = model_keys(&spec.model);
        let mut mismatched: Vec<String> = want
            .iter()
            .filter(|(k, v)| state.model.get(*k) != Some(*v))
            .map(|(k, v)| {
                let had = state.model.get(k).map_or_else(|| "missing".to_string(), |c| c.to_string());
                format!("model.{k} is {v} in the config but {had} in the checkpoint")
            })
            .collect();
        mismatched.sort();
        if !mismatched.is_empty() {
            return Err(LaunchError::Resume(format!(
                "{} holds a different model architecture: {}; restore those keys, or pass --fresh to start over",
                ckpt.path.display(),
                mismatched.join("; ")
            )));
        }
        let note = if state.global_batch != spec.global_batch {
            format!(
                ", keeping its global batch of {} (the config alone gives {})",
                state.global_batch, spec.global_batch
            )
        } else {
            String::new()
        };
        self.progress.println(&format!("resuming from {} (step {}){note}", ckpt.path.display(), state.step));
        Ok(Some((ckpt, state)))
    }

    fn previous_causes(&self) -> Vec<String> {
        self.attempts.iter().filter_map(|a| a.cause.as_ref().map(|c| format!("attempt {}: {c}", a.number))).collect()
    }

    async fn run_attempt(
        &mut self,
        attempt: u32,
        placement: &[RankPlacement],
        resume: Option<&Path>,
        global_batch: usize,
    ) -> Result<AttemptEnd, LaunchError> {
        let spec = &self.loaded.spec;
        let first_attempt = self.attempts.len() == 1;
        let world_size = placement.len();
        let mut phase_start = Instant::now();
        self.coordinator.begin_attempt(attempt, world_size);
        self.progress.set_attempt(attempt, self.restarts.total());
        let logs = self.run.attempt_logs(attempt)?;
        let master_port = free_port().map_err(LaunchError::Coordinator)?;

        self.progress.set_phase("spawning");
        let (mut agent, mut exits) = Agent::new();
        let (command, reports) = match &self.opts.program {
            WorkerProgram::Runtime(cmd) => (cmd.clone(), true),
            WorkerProgram::External(cmd) => (cmd.clone(), false),
        };
        let common = WorkerCommon {
            coordinator: self.coordinator.addr.to_string(),
            token: self.token.clone(),
            config: self.run.config_path(),
            run_dir: self.run.path.clone(),
            run_id: spec.name.clone(),
            master_port,
            attempt,
            max_restarts: spec.fault.max_restarts + spec.fault.max_user_restarts,
            world_size,
            global_batch,
            resume: resume.map(Path::to_path_buf),
            device: spec.device,
        };
        let allowed = allowed_cpus();
        for p in placement {
            let launch = WorkerLaunch {
                rank: p.rank,
                command: command.clone(),
                env: worker_env(&common, p, placement),
                log_path: logs.join(format!("{ROLE}-{}.log", p.rank)),
                cpus: if spec.device == DeviceKind::Cpu { pinned_cpus(p, &allowed) } else { Vec::new() },
            };
            if let Err(e) = agent.spawn(launch) {
                agent.stop_all(STOP_GRACE, &mut exits).await;
                return Err(e.into());
            }
        }
        if first_attempt {
            self.startup.spawn_s = phase_start.elapsed().as_secs_f64();
        }
        phase_start = Instant::now();
        self.progress.set_phase(if reports { "rendezvous" } else { "running" });
        tracing::info!(attempt, workers = world_size, logs = %logs.display(), "workers started");

        let rendezvous_deadline = tokio::time::Instant::now() + spec.rendezvous_timeout;
        let mut gang_complete = !reports;
        let mut reported: Vec<FailureReport> = Vec::new();
        let mut finished = 0usize;
        let mut health = tokio::time::interval(HEALTH_TICK);
        self.progressed.attempt_first = None;
        self.progressed.attempt_tokens = 0.0;

        let ending = loop {
            tokio::select! {
                Some(event) = self.events.recv() => match event {
                    CoordinatorEvent::Registered { rank } => tracing::debug!(rank, "registered"),
                    CoordinatorEvent::GangComplete => {
                        gang_complete = true;
                        if first_attempt {
                            self.startup.rendezvous_s = Some(phase_start.elapsed().as_secs_f64());
                        }
                        phase_start = Instant::now();
                        self.progress.set_phase("training");
                    }
                    CoordinatorEvent::Step(m) => {
                        if first_attempt && self.startup.first_step_s.is_none() {
                            self.startup.first_step_s = Some(phase_start.elapsed().as_secs_f64());
                            self.startup.launch_to_first_step_s = Some(self.opts.started.elapsed().as_secs_f64());
                        }
                        self.record_step(&m, attempt);
                    }
                    CoordinatorEvent::Failure(report) => reported.push(report),
                },
                Some(exit) = exits.recv() => {
                    agent.reaped(exit.rank);
                    if exit.kind.success() {
                        finished += 1;
                        if finished == world_size {
                            break Ending::Finished;
                        }
                        continue;
                    }
                    let detected = Instant::now();
                    // Let the rest of a cascade arrive, then stop whoever is left.
                    let mut failed = vec![exit];
                    let settle = tokio::time::Instant::now() + SETTLE;
                    while !agent.live_ranks().is_empty() {
                        let Ok(Some(other)) = tokio::time::timeout_at(settle, exits.recv()).await else { break };
                        agent.reaped(other.rank);
                        if !other.kind.success() {
                            failed.push(other);
                        }
                    }
                    let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                    break Ending::WorkersFailed { failed, stopped, detected };
                },
                _ = health.tick(), if gang_complete && reports => {
                    let timeout = spec.fault.heartbeat_timeout.as_secs_f64();
                    let hung = self.coordinator.heartbeats().into_iter().find(|(_, (age, _))| *age > timeout);
                    if let Some((rank, (age, step))) = hung {
                        let detected = Instant::now();
                        agent.kill(rank as usize);
                        let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                        break Ending::Hung { rank: rank as usize, age, step, stopped, detected };
                    }
                },
                _ = tokio::time::sleep_until(rendezvous_deadline), if !gang_complete => {
                    let missing = self.coordinator.missing_ranks();
                    let detected = Instant::now();
                    let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                    break Ending::RendezvousTimeout { missing, stopped, detected };
                },
                _ = self.sigint.recv() => {
                    self.progress.println("interrupted: stopping workers");
                    agent.stop_all(STOP_GRACE, &mut exits).await;
                    break Ending::Interrupted { signal: libc::SIGINT };
                },
                _ = self.sigterm.recv() => {
                    self.progress.println("terminated: stopping workers");
                    agent.stop_all(STOP_GRACE, &mut exits).await;
                    break Ending::Interrupted { signal: libc::SIGTERM };
                },
            }
        };
        // Steps and error reports sent right before the workers exited.
        while let Ok(event) = self.events.try_recv() {
            match event {
                CoordinatorEvent::Step(m) => self.record_step(&m, attempt),
                CoordinatorEvent::Failure(report) => reported.push(report),
                _ => {}
            }
        }
        reported.retain(|r| r.id.as_ref().is_some_and(|id| id.attempt == attempt));
        let stopped_list =
            |stopped: &[WorkerExit]| stopped.iter().map(|e| format!("{ROLE}:{} {}", e.rank, e.kind)).collect();
        Ok(match ending {
            Ending::Finished => AttemptEnd::Finished,
            Ending::Interrupted { signal } => AttemptEnd::Interrupted { signal },
            Ending::WorkersFailed { failed, stopped, detected } => {
                let (cause, class) = root_cause(&failed, &reported);
                let mut summary = failure_summary(&spec.name, attempt, cause, &reported, &logs);
                summary.stopped = stopped_list(&stopped);
                AttemptEnd::Failed { summary, class, detected }
            }
            Ending::Hung { rank, age, step, stopped, detected } => {
                let log_path = logs.join(format!("{ROLE}-{rank}.log"));
                let mut summary = FailureSummary::new(
                    &spec.name,
                    attempt,
                    format!(
                        "{ROLE}:{rank} stopped responding: no heartbeat for {age:.1} s after step {step} \
                         (fault.heartbeat_timeout_s = {})",
                        spec.fault.heartbeat_timeout.as_secs_f64()
                    ),
                );
                summary.failed = Some(RankFailure {
                    rank,
                    exit: "hung; killed by rtrain".into(),
                    error: None,
                    backtrace: None,
                    log_tail: log_tail(&log_path, 15),
                    log_path,
                });
                summary.stopped = stopped_list(&stopped);
                AttemptEnd::Failed { summary, class: FailureClass::Infrastructure, detected }
            }
            Ending::RendezvousTimeout { missing, stopped, detected } => {
                let mut summary = FailureSummary::new(
                    &spec.name,
                    attempt,
                    format!(
                        "rendezvous timed out after {:.0} s: rank(s) {:?} never registered (see rendezvous.timeout_s)",
                        spec.rendezvous_timeout.as_secs_f64(),
                        missing
                    ),
                );
                summary.stopped = stopped_list(&stopped);
                AttemptEnd::Failed { summary, class: FailureClass::Infrastructure, detected }
            }
        })
    }

    fn record_step(&mut self, m: &StepMetrics, attempt: u32) {
        if m.id.as_ref().is_some_and(|id| id.attempt != attempt) {
            return;
        }
        let p = &mut self.progressed;
        p.last_step = Some((m.step, m.loss, m.time));
        p.first_step_done_unix.get_or_insert(m.time);
        if p.attempt_first.is_some() {
            p.attempt_tokens += m.tokens_per_s * m.step_time_s;
        }
        if p.attempt_first.is_none() {
            p.attempt_first = Some((m.step, m.time));
            if let (Some(since), Some(record)) = (self.recovering_since.take(), self.attempts.iter_mut().rev().nth(1)) {
                record.recovery_s = Some(since.elapsed().as_secs_f64());
            }
        }
        self.progress.on_step(m);
        if let Err(e) = self.run.record_step(m, attempt, self.restarts.total()) {
            self.progress.println(&format!("warning: {e}"));
        }
    }
}

/// How the supervision loop of an attempt ended, before it is summarised.
enum Ending {
    Finished,
    Interrupted {
        signal: i32,
    },
    /// Workers that exited on their own with a failure, in the order they were seen.
    WorkersFailed {
        failed: Vec<WorkerExit>,
        stopped: Vec<WorkerExit>,
        detected: Instant,
    },
    Hung {
        rank: usize,
        age: f64,
        step: u64,
        stopped: Vec<WorkerExit>,
        detected: Instant,
    },
    RendezvousTimeout {
        missing: Vec<u32>,
        stopped: Vec<WorkerExit>,
        detected: Instant,
    },
}

/// The failure that caused the others, and its budget: a worker killed by a signal first, then
/// one whose own code failed, and only then one that merely lost a peer in a collective.
fn root_cause(failed: &[WorkerExit], reported: &[FailureReport]) -> (WorkerExit, FailureClass) {
    let report = |rank: usize| reported.iter().find(|r| r.id.as_ref().is_some_and(|id| id.rank as usize == rank));
    if let Some(e) = failed.iter().find(|e| matches!(e.kind, ExitKind::Signal(_))) {
        return (*e, FailureClass::Infrastructure);
    }
    if let Some(e) = failed.iter().find(|e| !report(e.rank).is_some_and(|r| r.collective)) {
        return (*e, FailureClass::User);
    }
    (failed[0], FailureClass::Infrastructure)
}

/// Unfinished checkpoint writes of an earlier attempt (no writer is running between attempts).
fn remove_unfinished_writes(run: &Path) {
    let dir = run.join(checkpoint::CHECKPOINTS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn failure_summary(
    job: &str,
    attempt: u32,
    first: WorkerExit,
    reported: &[FailureReport],
    logs: &Path,
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
    summary
}

fn describe(kind: ExitKind) -> String {
    match kind {
        ExitKind::Code(_) => format!("exited with {kind}"),
        ExitKind::Signal(_) => format!("was killed by {kind}"),
    }
}
