//! The roles beside the training gang (actors, services...): started once with the job, kept
//! running across the trainer's attempts, each its own fault domain. A process of a role that
//! restarts `alone` is restarted by itself; a `gang` role is stopped and started again as a
//! whole. Either way the other roles keep running and are told through the coordinator.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::mpsc;

use super::policy::{RestartDecision, role_restart};
use super::summary::{RoleAttempt, RoleSummary};
use super::{JobContext, STOP_GRACE};
use crate::agent::{Agent, ProcId, SpawnError, WorkerExit, WorkerLaunch};
use crate::config::{DeviceKind, RestartMode, RoleProgram, RoleSpec};
use crate::coordinator::CoordinatorHandle;
use crate::failure::{FailureSummary, RankFailure};
use crate::proto::FailureReport;
use crate::scheduler::RankPlacement;
use crate::worker_env::{free_port, pinned_cpus};

/// A process that ran at least this long before failing starts a new run of failures.
const STEADY: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the heartbeats of the side roles are checked.
const HEALTH_TICK: std::time::Duration = std::time::Duration::from_millis(250);

struct SideRole {
    spec: RoleSpec,
    placement: Vec<RankPlacement>,
    /// Incarnation of each rank (an alone role), or the role's attempt for every rank (a gang).
    attempt: Vec<u32>,
    started: Vec<Instant>,
    /// Failures in a row per rank (index 0 for a gang role).
    in_a_row: Vec<u32>,
    restarts: u32,
    records: Vec<RoleAttempt>,
    /// Ranks that exited 0 and are done.
    done: Vec<bool>,
    /// Ranks (or the whole role, `None`) waiting to restart, with when the failure was detected.
    restarting: Vec<(Option<usize>, Instant)>,
    master_port: u16,
}

/// What the side roles did.
pub(crate) enum SideEvent {
    Exit(WorkerExit),
    /// A scheduled restart is due: of role `.0`, one rank or the whole role.
    Due(usize, Option<usize>),
    /// Time to look for processes whose heartbeats stopped.
    Health,
}

/// How the side roles stand after an event.
pub(crate) enum SideState {
    Running,
    /// Every process of every side role exited 0.
    AllDone,
    /// A role spent its restart budget: the job fails with this summary.
    Failed(Box<FailureSummary>),
}

pub(crate) struct SideRoles {
    roles: Vec<SideRole>,
    agent: Agent,
    exits: mpsc::UnboundedReceiver<WorkerExit>,
    /// Exits seen while stopping a gang role, still to handle.
    deferred: VecDeque<WorkerExit>,
    /// Restarts waiting for their backoff: when, which role, which rank (`None`: the whole role).
    timers: Vec<(tokio::time::Instant, usize, Option<usize>)>,
    /// The latest error each process reported.
    reports: Vec<FailureReport>,
    health: tokio::time::Interval,
    /// A process that heartbeats and then falls silent this long is hung.
    heartbeat_timeout: std::time::Duration,
    /// Processes killed as hung, with why, for their root cause.
    hung: Vec<(ProcId, String)>,
}

impl SideRoles {
    pub(crate) fn new(
        specs: Vec<(RoleSpec, Vec<RankPlacement>)>,
        heartbeat_timeout: std::time::Duration,
    ) -> std::io::Result<Self> {
        let (agent, exits) = Agent::new();
        let mut roles = Vec::new();
        for (spec, placement) in specs {
            let n = placement.len();
            roles.push(SideRole {
                spec,
                placement,
                attempt: vec![0; n],
                started: vec![Instant::now(); n],
                in_a_row: vec![0; n],
                restarts: 0,
                records: Vec::new(),
                done: vec![false; n],
                restarting: Vec::new(),
                master_port: free_port()?,
            });
        }
        let mut health = tokio::time::interval(HEALTH_TICK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            roles,
            agent,
            exits,
            deferred: VecDeque::new(),
            timers: Vec::new(),
            reports: Vec::new(),
            health,
            heartbeat_timeout,
            hung: Vec::new(),
        })
    }

    /// Declares the roles to the coordinator and starts every process.
    pub(crate) fn start(&mut self, job: &JobContext, coordinator: &CoordinatorHandle) -> Result<(), SpawnError> {
        for r in 0..self.roles.len() {
            let role = &self.roles[r];
            coordinator.add_role(&role.spec.name, role.placement.len(), role.spec.restart == RestartMode::Gang, 0);
            for rank in 0..role.placement.len() {
                self.spawn(job, r, rank)?;
            }
        }
        Ok(())
    }

    fn spawn(&mut self, job: &JobContext, r: usize, rank: usize) -> Result<(), SpawnError> {
        let role = &mut self.roles[r];
        let attempt = role.attempt[rank];
        let role_env =
            job.role_env(&role.spec.name, attempt, role.spec.max_restarts, role.placement.len(), role.master_port);
        let p = &role.placement[rank];
        let log_path = job.role_log(&role.spec.name, rank);
        let header = format!("--- rtrain: {}:{rank} attempt {attempt} starting ---\n", role.spec.name);
        // Best effort: the spawn below reports a log that cannot be written.
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, header.as_bytes()));
        let launch = WorkerLaunch {
            id: ProcId::new(&role.spec.name, rank),
            command: job.command_of(&role.spec)?,
            env: job.env_of(&role_env, p, &role.placement, &[], false),
            log_path,
            echo: job.echo_of(&role.spec.name, rank, matches!(role.spec.program, RoleProgram::Command(_))),
            cpus: if job.device == DeviceKind::Cpu { pinned_cpus(p, &job.allowed_cpus) } else { Vec::new() },
            cwd: job.working_dir.clone(),
        };
        role.started[rank] = Instant::now();
        role.done[rank] = false;
        self.agent.spawn(launch).map(|_| ())
    }

    /// Waits for the next exit or due restart (forever, when there is neither).
    pub(crate) async fn next(&mut self) -> SideEvent {
        if let Some(exit) = self.deferred.pop_front() {
            return SideEvent::Exit(exit);
        }
        let due = self.timers.iter().enumerate().min_by_key(|(_, t)| t.0).map(|(i, t)| (i, t.0));
        let watched = !self.roles.is_empty();
        tokio::select! {
            Some(exit) = self.exits.recv() => SideEvent::Exit(exit),
            _ = self.health.tick(), if watched => SideEvent::Health,
            _ = async {
                match due {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let (i, _) = due.unwrap_or((0, tokio::time::Instant::now()));
                let (_, role, rank) = self.timers.swap_remove(i);
                SideEvent::Due(role, rank)
            }
        }
    }

    /// Keeps a process's reported error for its root cause.
    pub(crate) fn on_report(&mut self, report: FailureReport) {
        self.reports.push(report);
    }

    /// Carries out what an event calls for: a restart scheduled or started, or the job's end.
    pub(crate) async fn handle(
        &mut self,
        event: SideEvent,
        job: &JobContext,
        coordinator: &CoordinatorHandle,
    ) -> Result<SideState, SpawnError> {
        match event {
            SideEvent::Exit(exit) => Ok(self.on_exit(exit, job).await),
            SideEvent::Due(r, rank) => {
                self.restart(r, rank, job, coordinator)?;
                Ok(SideState::Running)
            }
            SideEvent::Health => {
                self.kill_hung(coordinator);
                Ok(SideState::Running)
            }
        }
    }

    /// Kills the processes whose heartbeats stopped; their exits then restart them.
    fn kill_hung(&mut self, coordinator: &CoordinatorHandle) {
        let timeout = self.heartbeat_timeout.as_secs_f64();
        for role in &self.roles {
            for (rank, (age, step)) in coordinator.heartbeats(&role.spec.name) {
                let id = ProcId::new(&role.spec.name, rank as usize);
                if age > timeout && self.agent.pid(&id).is_some() && !self.hung.iter().any(|(h, _)| *h == id) {
                    let why = format!(
                        "{id} stopped responding: no heartbeat for {age:.1} s after step {step} \
                         (fault.heartbeat_timeout_s = {timeout})"
                    );
                    tracing::warn!(process = %id, age, "hung; killing it");
                    self.agent.kill(&id);
                    self.hung.push((id, why));
                }
            }
        }
    }

    async fn on_exit(&mut self, exit: WorkerExit, job: &JobContext) -> SideState {
        self.agent.reaped(&exit.id);
        let Some(r) = self.roles.iter().position(|role| role.spec.name == exit.id.role) else {
            return SideState::Running;
        };
        let rank = exit.id.rank;
        let role = &mut self.roles[r];
        // A process of a gang role that is being restarted: expected.
        if role.restarting.iter().any(|(k, _)| k.is_none()) {
            return SideState::Running;
        }
        if exit.kind.success() {
            role.done[rank] = true;
            let all_done = self.roles.iter().all(|role| role.done.iter().all(|d| *d));
            return if all_done { SideState::AllDone } else { SideState::Running };
        }
        let detected = Instant::now();
        let gang = role.spec.restart == RestartMode::Gang;
        let slot = if gang { 0 } else { rank };
        if role.started[rank].elapsed() >= STEADY {
            role.in_a_row[slot] = 0;
        }
        role.in_a_row[slot] += 1;
        let cause = match self.hung.iter().position(|(h, _)| *h == exit.id) {
            Some(i) => self.hung.swap_remove(i).1,
            None => format!("{} {}", exit.id, super::describe(exit.kind)),
        };
        let role = &mut self.roles[r];
        let attempt = role.attempt[rank];
        match role_restart(&role.spec, role.restarts, role.in_a_row[slot]) {
            RestartDecision::Restart { delay, used, budget, key } => {
                role.restarts = used;
                role.records.push(RoleAttempt {
                    number: attempt,
                    rank: (!gang).then_some(rank),
                    cause: cause.clone(),
                    recovery_s: None,
                });
                let which = (!gang).then_some(rank);
                role.restarting.push((which, detected));
                job.println(&format!(
                    "{cause}; restarting {} in {:.2} s (restart {used} of {key} = {budget})",
                    if gang { format!("role {}", role.spec.name) } else { exit.id.to_string() },
                    delay.as_secs_f64()
                ));
                if gang {
                    let others: Vec<ProcId> =
                        self.agent.live().into_iter().filter(|id| id.role == exit.id.role).collect();
                    let seen = self.agent.stop(&others, STOP_GRACE, &mut self.exits).await;
                    self.deferred.extend(seen.into_iter().filter(|e| e.id.role != exit.id.role));
                }
                self.timers.push((tokio::time::Instant::now() + delay, r, which));
                SideState::Running
            }
            RestartDecision::GiveUp { reason } => {
                let mut summary = FailureSummary::new(&job.run_id, attempt, cause);
                let log_path = job.role_log(&exit.id.role, rank);
                let error = self.reports.iter().rev().find(|rep| {
                    rep.id
                        .as_ref()
                        .is_some_and(|id| id.role == exit.id.role && id.rank as usize == rank && id.attempt == attempt)
                });
                summary.failed = Some(RankFailure::new(rank, exit.kind.to_string(), error, log_path));
                summary.previous_attempts = self.roles[r]
                    .records
                    .iter()
                    .map(|a| format!("{} attempt {}: {}", self.roles[r].spec.name, a.number, a.cause))
                    .collect();
                summary.budget = Some(reason);
                SideState::Failed(Box::new(summary))
            }
        }
    }

    /// Starts again one rank (`Some`) or every rank of a gang role, and tells every role.
    fn restart(
        &mut self,
        r: usize,
        rank: Option<usize>,
        job: &JobContext,
        coordinator: &CoordinatorHandle,
    ) -> Result<(), SpawnError> {
        let role = &mut self.roles[r];
        let name = role.spec.name.clone();
        let ranks: Vec<usize> = match rank {
            Some(k) => vec![k],
            None => (0..role.placement.len()).collect(),
        };
        let detected = role.restarting.iter().position(|(k, _)| *k == rank).map(|i| role.restarting.remove(i).1);
        let attempt = ranks.iter().map(|k| role.attempt[*k]).max().unwrap_or(0) + 1;
        for k in &ranks {
            role.attempt[*k] = attempt;
        }
        match rank {
            Some(k) => coordinator.restart_rank(&name, k as u32, attempt),
            None => coordinator.begin_attempt(&name, attempt, ranks.len()),
        }
        for k in ranks {
            self.spawn(job, r, k)?;
        }
        let role = &mut self.roles[r];
        if let (Some(since), Some(record)) = (detected, role.records.iter_mut().rev().find(|a| a.rank == rank)) {
            record.recovery_s = Some(since.elapsed().as_secs_f64());
        }
        let payload = match rank {
            Some(k) => serde_json::json!({ "role": name, "rank": k, "attempt": attempt }),
            None => serde_json::json!({ "role": name, "attempt": attempt }),
        };
        job.tell_every_role(coordinator, "restarted", &payload.to_string());
        Ok(())
    }

    /// Stops every process of every side role (the job is over).
    pub(crate) async fn stop_all(&mut self) {
        self.timers.clear();
        self.agent.stop_all(STOP_GRACE, &mut self.exits).await;
    }

    /// Each role's number of processes, in order.
    /// The live processes of every side role, with their pids.
    pub(crate) fn pids(&self) -> Vec<(ProcId, i32)> {
        self.agent.pids()
    }

    pub(crate) fn sizes(&self) -> Vec<usize> {
        self.roles.iter().map(|r| r.placement.len()).collect()
    }

    /// Each role's size, restarts and restart records.
    pub(crate) fn summaries(&self) -> Vec<(String, RoleSummary)> {
        self.roles
            .iter()
            .map(|r| {
                let summary =
                    RoleSummary { size: r.placement.len(), restarts: r.restarts, attempts: r.records.clone() };
                (r.spec.name.clone(), summary)
            })
            .collect()
    }

    /// One line per role for the progress display: processes running and restarts.
    pub(crate) fn status(&self) -> Vec<(String, String)> {
        self.roles
            .iter()
            .map(|r| {
                let live = self.agent.live().iter().filter(|id| id.role == r.spec.name).count();
                let restarts =
                    if r.restarts == 1 { "1 restart".to_string() } else { format!("{} restarts", r.restarts) };
                (r.spec.name.clone(), format!("{live}/{} running, {restarts}", r.placement.len()))
            })
            .collect()
    }
}
