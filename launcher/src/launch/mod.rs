//! The driver of one job: place every role, start the coordinator and the processes, supervise
//! them until the training role finishes (or, in a job without one, every process has exited 0),
//! a role fails past its budget, or the launch is interrupted; then write the run's outputs.
//!
//! The decisions (root cause, budgets, backoff) are pure functions in [`policy`]; the training
//! gang's attempts are driven in [`attempt`], the other roles in [`side_roles`].

mod attempt;
mod hosts;
mod placement;
pub mod policy;
mod side_roles;
pub mod status;
pub mod summary;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::agent::{ExitKind, SpawnError};
use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::cluster::ClusterError;
use crate::config::{ClusterSpec, DeviceKind, EchoChoice, JobSpec, LoadedConfig, RoleProgram, RoleSpec};
use crate::contract::WorkerEnv;
use crate::contract::unix_now;
use crate::coordinator::{CoordinatorEvent, CoordinatorHandle, CoordinatorSetup, serve_coordinator};
use crate::dashboard::{Dashboard, view_token};
use crate::failure::FailureSummary;
use crate::hosts::{Hosts, RemoteHost};
use crate::progress::RunProgress;
use crate::proto::{MetricsReport, StepMetrics};
use crate::run_dir::{RunDir, RunDirError};
use crate::scheduler::{GroupRequest, NodeResources, RankPlacement, ScheduleError};
use crate::worker_env::{allowed_cpus, worker_env};
use policy::{FailureClass, GangFailure, RestartDecision, Restarts, after_gang_failure};
use side_roles::{SideRoles, SideState};
pub use summary::{AttemptRecord, RoleSummary, RunSummary, StartupPhases};

/// Time workers get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the training role's workers run.
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
    /// `rtrain-worker`, which runs the built-in role programs (`rtrain-worker role NAME`), when
    /// it was found.
    pub builtin_exe: Option<PathBuf>,
    /// The Slurm allocation the launch runs in: over several nodes, they are the job's hosts.
    pub slurm: Option<crate::slurm::Allocation>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("cannot place the job: {0}")]
    Schedule(#[from] ScheduleError),
    #[error("cannot start the coordinator: {0}")]
    Coordinator(std::io::Error),
    #[error("cannot start workers: {0}")]
    Spawn(#[from] SpawnError),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("cannot serve the dashboard on 127.0.0.1:{port}: {source} (set dashboard.port to a free port, 0 for any)")]
    Dashboard { port: u16, source: std::io::Error },
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("cannot listen on cluster.bind = {bind}: {source}")]
    Bind { bind: std::net::SocketAddr, source: std::io::Error },
    #[error("slurm: {0}")]
    Slurm(#[from] crate::slurm::SlurmError),
    #[error(transparent)]
    WorkingDir(#[from] crate::working_dir::BundleError),
}

/// How a launch ended.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant, reason = "one per launch; boxing would buy nothing")]
pub enum Outcome {
    Finished,
    Failed(FailureSummary),
    Interrupted { signal: i32 },
}

pub struct LaunchReport {
    pub outcome: Outcome,
    pub summary: RunSummary,
    pub run_path: PathBuf,
    /// Why summary.json could not be written, if it could not.
    pub summary_error: Option<RunDirError>,
}

/// What every process of the job is told, and where its log goes.
pub(crate) struct JobContext {
    /// Where every process runs (`job.working_dir`).
    working_dir: PathBuf,
    coordinator: String,
    http: String,
    token: String,
    config: PathBuf,
    run_dir: PathBuf,
    pub(crate) run_id: String,
    pub(crate) device: DeviceKind,
    pub(crate) allowed_cpus: Vec<usize>,
    /// The GPUs the launcher may use, by the names its workers' CUDA_VISIBLE_DEVICES take.
    visible_devices: Vec<String>,
    /// Every role's name, to tell them all of a restart.
    roles: Vec<String>,
    /// `job.env`, set for every process before rtrain's own variables.
    user_env: Vec<(String, String)>,
    echo: EchoChoice,
    progress: RunProgress,
    builtin_exe: Option<PathBuf>,
    /// The other hosts of a job over several.
    hosts: Arc<Hosts>,
    /// The job CA's certificate, when the control plane is TLS (a job over several hosts).
    tls_ca: Option<String>,
    /// The driver host's address that the other hosts reach (a job over several hosts).
    bind_host: Option<String>,
    /// The hosts it runs on (`[cluster]`, or the Slurm allocation's).
    cluster: ClusterSpec,
    /// The agents of the other hosts are started by the launch itself (with srun).
    agents_started: bool,
}

impl JobContext {
    /// The command a side role's processes run.
    fn command_of(&self, role: &RoleSpec) -> Result<Vec<String>, SpawnError> {
        match &role.program {
            RoleProgram::Command(cmd) => Ok(cmd.clone()),
            RoleProgram::BuiltIn(name) => match &self.builtin_exe {
                Some(exe) => Ok(vec![exe.display().to_string(), "role".into(), name.clone()]),
                None => Err(SpawnError::Program(format!(
                    "role {}: the built-in program {name} is run by rtrain-worker, which is not installed beside this executable",
                    role.name
                ))),
            },
            RoleProgram::Worker => Err(SpawnError::Program(format!(
                "role {}: only the training role runs the job's worker program",
                role.name
            ))),
        }
    }

    /// What every process of `role`'s attempt `attempt` is told (its rank's own numbers are
    /// filled in by [`JobContext::env_of`]).
    fn role_env(&self, role: &str, attempt: u32, max_restarts: u32, world_size: usize, master_port: u16) -> WorkerEnv {
        WorkerEnv {
            rank: 0,
            local_rank: 0,
            world_size,
            local_world_size: world_size,
            node_rank: 0,
            role: role.to_string(),
            attempt,
            max_restarts,
            run_id: self.run_id.clone(),
            master_addr: self.bind_host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            coordinator: self.coordinator.clone(),
            http: Some(self.http.clone()),
            token: self.token.clone(),
            config: self.config.clone(),
            run_dir: Some(self.run_dir.clone()),
            global_batch: None,
            resume_from: None,
            threads: None,
            cuda_visible_devices: None,
            tls_ca: self.tls_ca.clone(),
            nodes: 1,
            bind_host: self.bind_host.clone(),
        }
    }

    /// The environment of rank `p` of a role placed as `all`, on the driver's host or, when
    /// `p.node` > 0, on `remotes[p.node - 1]` (which has no HTTP endpoint: it serves loopback).
    /// `gang`: the training role, whose ranks see their host's GPUs; others see only their own.
    fn env_of(
        &self,
        role_env: &WorkerEnv,
        p: &RankPlacement,
        all: &[RankPlacement],
        remotes: &[Arc<RemoteHost>],
        gang: bool,
    ) -> Vec<(String, String)> {
        let mut env = self.user_env.clone();
        let cuda = self.device == DeviceKind::Cuda;
        match p.node.checked_sub(1).and_then(|i| remotes.get(i)) {
            None => env.extend(worker_env(role_env, p, all, cuda, !gang, &self.visible_devices)),
            Some(host) => {
                let there = WorkerEnv { http: None, bind_host: Some(host.info.address.clone()), ..role_env.clone() };
                env.extend(worker_env(&there, p, all, cuda, !gang, &host.info.devices));
            }
        }
        env
    }

    /// Where the output of process `role:rank` is shown besides its log: only for the job's own
    /// programs (`user_code`), as `job.echo` says.
    fn echo_of(&self, role: &str, rank: usize, user_code: bool) -> Option<(String, crate::progress::Printer)> {
        let shown = match self.echo {
            EchoChoice::All => true,
            EchoChoice::Rank0 => rank == 0,
            EchoChoice::Off => false,
        };
        (user_code && shown).then(|| (format!("{role}:{rank}| "), self.progress.printer()))
    }

    /// `logs/<role>/<role>-<rank>.log`: one file per process of a side role, across restarts.
    fn role_log(&self, role: &str, rank: usize) -> PathBuf {
        let dir = self.run_dir.join("logs").join(role);
        // A directory that cannot be made is reported by the spawn that opens the log in it.
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("{role}-{rank}.log"))
    }

    /// Sends an event from the driver to every process of every role.
    fn tell_every_role(&self, coordinator: &CoordinatorHandle, kind: &str, payload: &str) {
        for role in &self.roles {
            coordinator.send(role, None, kind, payload);
        }
    }

    fn println(&self, line: &str) {
        self.progress.println(line);
    }

    /// How the other hosts join, for the messages that wait for them.
    fn agents_hint(&self) -> String {
        if self.agents_started {
            let log = self.run_dir.join("logs").join("agents.log");
            return format!("their agents were started with srun (their output: {})", log.display());
        }
        let token = self.cluster.token_file.as_ref().map_or(String::new(), |p| p.display().to_string());
        let ca = match &self.cluster.tls {
            Some(files) => format!(" --ca-file {}", files.ca.display()),
            None => String::new(),
        };
        format!("run `rtrain agent --join {} --token-file {token}{ca}` on each", self.coordinator)
    }
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

/// Everything the supervision loops need from the launch around them.
struct Launch<'a> {
    loaded: &'a LoadedConfig,
    opts: &'a LaunchOptions,
    run: RunDir,
    job: JobContext,
    coordinator: CoordinatorHandle,
    events: mpsc::UnboundedReceiver<CoordinatorEvent>,
    side: SideRoles,
    sigint: Signal,
    sigterm: Signal,
    startup: StartupPhases,
    progressed: Progressed,
    restarts: Restarts,
    attempts: Vec<AttemptRecord>,
    /// When the failure that ended the previous attempt was detected.
    recovering_since: Option<Instant>,
    /// Where the dashboard is served (without its token), for status.json.
    dashboard: Option<String>,
}

/// The gang scheduler's requests for every role of `spec`, in order; `fixed` pins the sizes of
/// the roles after the training role (the ones already running, when the trainer restarts).
fn group_requests(spec: &JobSpec, fixed: Option<&[usize]>) -> Vec<GroupRequest> {
    let mut side = 0;
    spec.roles
        .iter()
        .map(|r| {
            let (min, max) = match fixed {
                Some(sizes) if !r.training => {
                    side += 1;
                    let n = sizes.get(side - 1).copied().unwrap_or(r.size);
                    (n, n)
                }
                _ => (r.min_size, r.size),
            };
            GroupRequest {
                role: r.name.clone(),
                min_workers: min,
                max_workers: max,
                cpus_per_worker: r.cpus_per_worker,
                gpus_per_worker: r.gpus_per_worker,
                size_key: r.key("size"),
                cpus_key: r.key("cpus_per_worker"),
            }
        })
        .collect()
}

/// Runs the job described by `loaded` to its end, restarting failed processes and attempts within
/// the restart budgets.
pub async fn launch(loaded: &LoadedConfig, opts: &LaunchOptions) -> Result<LaunchReport, LaunchError> {
    let spec = &loaded.spec;
    let slurm = opts.slurm.as_ref().filter(|a| a.nodes.len() > 1);
    let cluster = match slurm {
        Some(alloc) => crate::slurm::cluster_in(alloc, spec)?,
        None => spec.cluster.clone(),
    };
    // The whole job is placed before anything starts or any file is written (over several hosts,
    // the training gang is placed once they have joined).
    let placements = if cluster.multi_host() {
        let side: Vec<GroupRequest> = group_requests(spec, None)
            .into_iter()
            .zip(&spec.roles)
            .filter(|(_, r)| !r.training)
            .map(|(g, _)| g)
            .collect();
        let mut side = crate::scheduler::place_job(&side, NodeResources::local())?.into_iter();
        spec.roles.iter().map(|r| if r.training { Vec::new() } else { side.next().unwrap_or_default() }).collect()
    } else {
        placement::place_roles(spec, None, &[NodeResources::local()])?
    };
    let hosts::Prepared { token, tls, bundle } = hosts::prepare(spec, &cluster)?;
    // Its port is taken before the run directory, so a port in use fails the launch untouched.
    let settings = &loaded.config.dashboard;
    let dashboard = match settings.enabled {
        true => Some(
            Dashboard::start(spec.run_path.clone(), view_token(&token), settings.port)
                .await
                .map_err(|e| LaunchError::Dashboard { port: settings.port, source: e })?,
        ),
        false => None,
    };
    let run = RunDir::open(&spec.run_path, &loaded.config, opts.fresh)?;
    let training = spec.training_role().map(|r| r.name.clone());
    let shipped = bundle.as_ref().map(|b| (b.digest.clone(), b.root.clone()));
    let hosts = Arc::new(Hosts::new(cluster.hosts, shipped));
    let setup = CoordinatorSetup {
        bind: cluster.bind,
        token: token.clone(),
        training_role: training,
        hosts: hosts.clone(),
        tls: tls.as_ref().map(|t| (t.cert_pem.clone(), t.key_pem.clone())),
        working_dir: bundle.clone(),
    };
    let (coordinator, events) =
        serve_coordinator(setup).await.map_err(|source| LaunchError::Bind { bind: cluster.bind, source })?;
    let side_specs: Vec<_> = spec.roles.iter().cloned().zip(placements).filter(|(r, _)| !r.training).collect();
    let side_names: Vec<String> = side_specs.iter().map(|(r, _)| r.name.clone()).collect();
    let job = JobContext {
        coordinator: coordinator.addr.to_string(),
        http: coordinator.http_addr.to_string(),
        token,
        config: run.config_path(),
        run_dir: run.path.clone(),
        run_id: spec.name.clone(),
        device: spec.device,
        allowed_cpus: allowed_cpus(),
        visible_devices: NodeResources::local_devices(),
        roles: spec.roles.iter().map(|r| r.name.clone()).collect(),
        user_env: spec.env.clone(),
        working_dir: spec.working_dir.clone(),
        echo: spec.echo,
        progress: RunProgress::new(spec.training_role().map(|_| spec.steps), &side_names),
        builtin_exe: opts.builtin_exe.clone(),
        hosts,
        tls_ca: tls.map(|t| t.ca_pem),
        bind_host: cluster.multi_host().then(|| coordinator.addr.ip().to_string()),
        cluster: cluster.clone(),
        agents_started: slurm.is_some(),
    };
    // Inside a Slurm allocation the driver starts the other nodes' agents itself.
    let _agents = match (slurm, &cluster.token_file) {
        (Some(alloc), Some(token_file)) => {
            Some(hosts::start_slurm_agents(alloc, &job, coordinator.addr, token_file, spec)?)
        }
        _ => None,
    };
    if let Some(d) = &dashboard {
        job.println(&format!("dashboard: {}", d.url()));
    }
    if let Some(b) = &bundle {
        job.println(&format!(
            "shipping job.working_dir {} to the other hosts: {} files, {:.1} MB (sha256 {})",
            b.root.display(),
            b.files,
            b.bytes.len() as f64 / 1e6,
            &b.digest[..12]
        ));
    }
    if let Some(old) = run.moved_aside().filter(|_| !opts.fresh) {
        job.println(&format!(
            "the earlier run here left no checkpoint to resume from: starting over (its files are kept in {})",
            old.display()
        ));
    }
    let mut side = SideRoles::new(side_specs, spec.fault.heartbeat_timeout).map_err(LaunchError::Coordinator)?;
    if let Err(e) = side.start(&job, &coordinator) {
        side.stop_all().await;
        coordinator.shutdown();
        return Err(e.into());
    }
    let mut l = Launch {
        loaded,
        opts,
        run,
        job,
        coordinator,
        events,
        side,
        sigint: signal(SignalKind::interrupt()).map_err(LaunchError::Coordinator)?,
        sigterm: signal(SignalKind::terminate()).map_err(LaunchError::Coordinator)?,
        startup: StartupPhases::default(),
        progressed: Progressed::default(),
        restarts: Restarts::default(),
        attempts: Vec::new(),
        recovering_since: None,
        dashboard: dashboard.as_ref().map(|d| format!("http://{}/", d.addr)),
    };
    let result = if spec.training_role().is_some() { l.supervise().await } else { l.supervise_side_roles().await };
    let ended = match &result {
        Ok((Outcome::Finished, ..)) => "finished",
        Ok((Outcome::Interrupted { .. }, ..)) => "interrupted",
        Ok((Outcome::Failed(_), ..)) | Err(_) => "failed",
    };
    l.write_status(ended, l.attempts.last().map_or(0, |a| a.number), &[]);
    // The job is over: the other roles go with it (told first, then SIGTERM, grace, SIGKILL).
    l.job.tell_every_role(&l.coordinator, "stop", "{}");
    l.side.stop_all().await;
    l.job.progress.finish();
    let roles = l.role_summaries();
    let Launch { run, coordinator, startup, progressed, restarts, attempts, job, .. } = l;
    // The agents of other hosts leave with the job; their last command needs a moment to go out.
    let why = match ended {
        "finished" => "the job finished",
        "interrupted" => "the job was interrupted",
        _ => "the job failed",
    };
    if job.hosts.end_all(why) > 0 {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    coordinator.shutdown();
    drop(dashboard);
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
        roles,
        rl: read_json(&run.path.join(crate::config::rl::EVAL_FILE)),
        preference: read_json(&run.path.join(crate::config::preference::EVAL_FILE)),
    };
    // The outcome stands even when it cannot be recorded (a full disk): it is reported, and so
    // is what was not written.
    let summary_error = run.write_summary(&summary).err();
    Ok(LaunchReport { outcome, summary, run_path: run.path.clone(), summary_error })
}

/// How one attempt of the training gang ended.
enum AttemptEnd {
    Finished,
    Interrupted {
        signal: i32,
    },
    Failed {
        summary: FailureSummary,
        class: FailureClass,
        detected: Instant,
        /// How the root cause failed, to compare with the next attempt (see [`policy::signature`]).
        signature: Option<String>,
        /// The root cause said a restart would fail the same way.
        deterministic: bool,
    },
    /// Another role spent its budget: the job fails, whatever the trainer's budgets.
    JobFailed(FailureSummary),
}

impl Launch<'_> {
    /// Runs attempts of the training gang until one finishes, the launch is interrupted, or a
    /// budget is spent. Returns the outcome, the last attempt's gang size and its global batch.
    async fn supervise(&mut self) -> Result<(Outcome, usize, usize), LaunchError> {
        let spec = &self.loaded.spec;
        let mut attempt = self.run.next_attempt();
        let mut workers = spec.workers;
        let mut global_batch = spec.global_batch;
        // Consecutive failed attempts that did not complete a step.
        let mut streak = 0u32;
        let mut previous_failure: Option<GangFailure> = None;
        loop {
            self.job.progress.set_phase("scheduling");
            let resume = match self.pick_checkpoint() {
                Ok(resume) => resume,
                Err(e) if self.attempts.is_empty() => return Err(e),
                Err(e) => {
                    let mut summary = FailureSummary::new(&spec.name, attempt, format!("cannot restart: {e}"));
                    summary.previous_attempts = self.previous_causes();
                    return Ok((Outcome::Failed(summary), workers, global_batch));
                }
            };
            if let Some((_, state)) = &resume {
                global_batch = state.global_batch;
                self.job.progress.set_position(state.step);
                if state.step >= spec.steps {
                    let done = state.metric.unwrap_or(f64::NAN);
                    self.progressed.last_step = Some((state.step, done, unix_now()));
                    if self.run.finished_before() {
                        self.job.println(&format!(
                            "{} is already complete at step {} of train.steps = {}; nothing to run (pass --fresh to train again)",
                            spec.name, state.step, spec.steps
                        ));
                        return Ok((Outcome::Finished, state.world_size, global_batch));
                    }
                    // The final checkpoint is there but the launch that wrote it did not finish: the
                    // loop's last stage (an SFT export) is run again from it, with no step to train.
                    if self.attempts.is_empty() {
                        self.job.println(&format!(
                            "{} reached step {} of train.steps = {}, but its last launch did not finish; \
                             running its final stage again from the final checkpoint",
                            spec.name, state.step, spec.steps
                        ));
                    }
                }
            }
            let side_sizes = self.side.sizes();
            let (placement, remotes) = match self.place_gang(&side_sizes).await {
                Ok(placed) => placed,
                Err(placement::Unplaced::Interrupted(signal)) => {
                    return Ok((Outcome::Interrupted { signal }, workers, global_batch));
                }
                Err(placement::Unplaced::Schedule(e)) if self.attempts.is_empty() => return Err(e.into()),
                Err(placement::Unplaced::Schedule(e)) => {
                    let mut summary =
                        FailureSummary::new(&spec.name, attempt, format!("cannot place the gang for a restart: {e}"));
                    summary.previous_attempts = self.previous_causes();
                    return Ok((Outcome::Failed(summary), workers, global_batch));
                }
                Err(placement::Unplaced::Hosts(why)) => {
                    let mut summary = FailureSummary::new(&spec.name, attempt, why);
                    summary.previous_attempts = self.previous_causes();
                    return Ok((Outcome::Failed(summary), workers, global_batch));
                }
            };
            if placement.len() != workers && !self.attempts.is_empty() {
                self.job.println(&format!(
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
            let end = self.run_attempt(attempt, &placement, &remotes, resume_path.as_deref(), global_batch).await?;
            let (summary, failure, detected) = match end {
                AttemptEnd::Finished => return Ok((Outcome::Finished, workers, global_batch)),
                AttemptEnd::Interrupted { signal } => {
                    return Ok((Outcome::Interrupted { signal }, workers, global_batch));
                }
                AttemptEnd::JobFailed(summary) => return Ok((Outcome::Failed(summary), workers, global_batch)),
                AttemptEnd::Failed { summary, class, detected, signature, deterministic } => {
                    let trained = match self.opts.program {
                        WorkerProgram::Runtime(_) => Some(self.progressed.attempt_first.is_some()),
                        WorkerProgram::External(_) => None,
                    };
                    (summary, GangFailure { class, signature, deterministic, trained }, detected)
                }
            };
            let class = failure.class;
            if let Some(record) = self.attempts.last_mut() {
                record.cause = Some(summary.root_cause.clone());
                record.class = Some(class);
            }
            let previous = self.previous_causes();
            let previous = previous[..previous.len().saturating_sub(1)].to_vec();
            // Back off exponentially over consecutive failures; an attempt that trained resets it.
            streak = if self.progressed.attempt_first.is_some() { 1 } else { streak + 1 };
            let decision =
                after_gang_failure(&failure, previous_failure.as_ref(), &mut self.restarts, &spec.fault, streak);
            previous_failure = Some(failure);
            let (delay, used, budget, key) = match decision {
                RestartDecision::Restart { delay, used, budget, key } => (delay, used, budget, key),
                RestartDecision::GiveUp { reason } => {
                    let mut summary = summary;
                    summary.previous_attempts = previous;
                    summary.budget = Some(reason);
                    return Ok((Outcome::Failed(summary), workers, global_batch));
                }
            };
            self.job.println(&format!(
                "attempt {attempt} failed: {}; restarting in {:.2} s (restart {used} of {key} = {budget})",
                summary.root_cause,
                delay.as_secs_f64(),
            ));
            self.recovering_since = Some(detected);
            let until = tokio::time::Instant::now() + delay;
            if let Some(end) = self.wait_side_roles(Some(until)).await? {
                return Ok((end, workers, global_batch));
            }
            attempt += 1;
        }
    }

    /// A job without a training role: runs until every process exited 0, a role fails past its
    /// budget, or the launch is interrupted.
    async fn supervise_side_roles(&mut self) -> Result<(Outcome, usize, usize), LaunchError> {
        self.job.progress.set_phase("running");
        let end = self.wait_side_roles(None).await?;
        Ok((end.unwrap_or(Outcome::Finished), 0, 0))
    }

    /// Serves the other roles (restarts, metrics, events) until `until` (returns `None`) or until
    /// the job ends: interrupted, failed by a role, or, with no deadline, every process done.
    async fn wait_side_roles(&mut self, until: Option<tokio::time::Instant>) -> Result<Option<Outcome>, LaunchError> {
        let mut status = tokio::time::interval(std::time::Duration::from_secs(1));
        let attempt = self.attempts.last().map_or(0, |a| a.number);
        // Between attempts of the training gang (its restart backoff) none of its processes runs.
        let state = if until.is_some() { "restarting" } else { "running" };
        loop {
            tokio::select! {
                _ = status.tick() => self.write_status(state, attempt, &[]),
                _ = async { match until { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    return Ok(None);
                }
                Some(event) = self.events.recv() => {
                    // No attempt of the training gang is running: its late reports are dropped.
                    let _ = self.on_event(event);
                }
                event = self.side.next() => {
                    match self.side.handle(event, &self.job, &self.coordinator).await? {
                        SideState::Running => self.show_roles(),
                        SideState::AllDone if until.is_none() => return Ok(Some(Outcome::Finished)),
                        SideState::AllDone => {}
                        SideState::Failed(summary) => return Ok(Some(Outcome::Failed(*summary))),
                    }
                }
                _ = self.sigint.recv() => {
                    self.job.println("interrupted: stopping workers");
                    return Ok(Some(Outcome::Interrupted { signal: libc::SIGINT }));
                }
                _ = self.sigterm.recv() => {
                    self.job.println("terminated: stopping workers");
                    return Ok(Some(Outcome::Interrupted { signal: libc::SIGTERM }));
                }
            }
        }
    }

    /// Handles what the coordinator says about the roles beside the training gang (and the
    /// metrics of any role); returns what is about the training gang.
    fn on_event(&mut self, event: CoordinatorEvent) -> Option<CoordinatorEvent> {
        match event {
            CoordinatorEvent::Metrics(report) => {
                self.record_metrics(&report);
                None
            }
            CoordinatorEvent::Failure(report) if !report.id.as_ref().is_some_and(|id| self.is_training(&id.role)) => {
                self.side.on_report(report);
                None
            }
            other => Some(other),
        }
    }

    fn is_training(&self, role: &str) -> bool {
        self.loaded.spec.training_role().is_some_and(|t| t.name == role)
    }

    fn show_roles(&self) {
        for (role, status) in self.side.status() {
            self.job.progress.set_role_status(&role, &status);
        }
    }

    fn role_summaries(&self) -> std::collections::BTreeMap<String, RoleSummary> {
        let mut roles: std::collections::BTreeMap<String, RoleSummary> = self.side.summaries().into_iter().collect();
        if let Some(trainer) = self.loaded.spec.training_role() {
            let attempts = self
                .attempts
                .iter()
                .filter_map(|a| {
                    a.cause.as_ref().map(|cause| summary::RoleAttempt {
                        number: a.number,
                        rank: None,
                        cause: cause.clone(),
                        recovery_s: a.recovery_s,
                    })
                })
                .collect();
            let size = self.attempts.last().map_or(trainer.size, |a| a.workers);
            roles.insert(trainer.name.clone(), RoleSummary { size, restarts: self.restarts.total(), attempts });
        }
        roles
    }

    /// The newest checkpoint that verifies (saying which newer ones were skipped and why), with
    /// its trainer state.
    fn pick_checkpoint(&mut self) -> Result<Option<(Checkpoint, TrainerState)>, LaunchError> {
        if matches!(self.opts.program, WorkerProgram::External(_)) {
            return Ok(None);
        }
        let run_path = &self.run.path;
        remove_unfinished_writes(run_path);
        let scan = checkpoint::newest_valid(run_path).map_err(|e| LaunchError::Resume(e.to_string()))?;
        for (ckpt, why) in &scan.skipped {
            self.job.println(&format!("warning: skipping checkpoint {}: {why}", ckpt.path.display()));
        }
        let Some((ckpt, checkpoint::Verified { state, .. })) = scan.newest else {
            if scan.skipped.is_empty() {
                return Ok(None);
            }
            // Starting over would train from step 0 and rotate the damaged ones away.
            return Err(LaunchError::Resume(format!(
                "every checkpoint in {} is damaged ({} of them, reasons above), so there is nothing to resume \
                 from; restore one, or pass --fresh to start over (the old run is kept beside it)",
                run_path.join(checkpoint::CHECKPOINTS_DIR).display(),
                scan.skipped.len()
            )));
        };
        // The architecture is checked by the worker against its loop's own fingerprint, before it
        // restores anything: only the loop knows what makes two of its models compatible.
        let spec = &self.loaded.spec;
        let note = if state.global_batch != spec.global_batch {
            format!(
                ", keeping its global batch of {} (the config alone gives {})",
                state.global_batch, spec.global_batch
            )
        } else {
            String::new()
        };
        self.job.println(&format!("resuming from {} (step {}){note}", ckpt.path.display(), state.step));
        Ok(Some((ckpt, state)))
    }

    fn previous_causes(&self) -> Vec<String> {
        self.attempts.iter().filter_map(|a| a.cause.as_ref().map(|c| format!("attempt {}: {c}", a.number))).collect()
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
        self.job.progress.on_step(m);
        if let Some(eval) = m.extra.get("eval_loss") {
            self.job.println(&format!("step {}: eval_loss {eval:.4} (loss {:.4})", m.step, m.loss));
        }
        if let Some(error) = &m.checkpoint_error {
            self.job.println(&format!(
                "warning: a checkpoint was not saved (reported at step {}): {error}; the previous checkpoints are \
                 intact, training goes on",
                m.step
            ));
        }
        if let Err(e) = self.run.record_step(m, attempt, self.restarts.total()) {
            self.job.println(&format!("warning: {e}"));
        }
    }

    fn record_metrics(&mut self, report: &MetricsReport) {
        if let Some(id) = &report.id {
            self.job.progress.on_role_metrics(&id.role, &report.metrics);
        }
        if let Err(e) = self.run.record_metrics(report) {
            self.job.println(&format!("warning: {e}"));
        }
    }
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

fn describe(kind: ExitKind) -> String {
    match kind {
        ExitKind::Code(_) => format!("exited with {kind}"),
        ExitKind::Signal(_) => format!("was killed by {kind}"),
        ExitKind::Lost => "was lost with its host (its agent's session ended)".to_string(),
    }
}

/// A JSON file the trainer left in the run directory, if it is there and whole.
fn read_json(path: &Path) -> Option<serde_json::Value> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok())
}
