//! One attempt of the training gang: spawn its ranks, follow the rendezvous, steps and
//! heartbeats, and stop the whole gang at the first failure, a hang, or an interrupt. The other
//! roles are served meanwhile, and a role that fails past its budget ends the attempt and the job.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::policy::{FailureClass, root_cause, signature};
use super::side_roles::SideState;
use super::{AttemptEnd, Launch, LaunchError, STOP_GRACE, WorkerProgram, describe};
use crate::agent::{Agent, ExitKind, ProcId, WorkerExit, WorkerLaunch};
use crate::config::DeviceKind;
use crate::coordinator::CoordinatorEvent;
use crate::failure::{FailureSummary, RankFailure};
use crate::hosts::RemoteHost;
use crate::proto::FailureReport;
use crate::scheduler::RankPlacement;
use crate::worker_env::{free_port, pinned_cpus};

/// After a first worker failure, how long to wait for the others' exits before choosing the
/// root cause: a rank killed by a signal takes its peers down with it within milliseconds, and
/// the killed rank, not a peer that lost its connection, is the cause.
const SETTLE: Duration = Duration::from_millis(50);
/// When every rank that failed so far only lost a peer, how long to wait for the rank that
/// caused it to exit and report on its own (it is usually on its way out already).
const LOST_PEER_GRACE: Duration = Duration::from_secs(3);
/// How often `status.json` is rewritten.
const STATUS_TICK: Duration = Duration::from_secs(1);
/// How often heartbeats are checked for hung workers.
const HEALTH_TICK: Duration = Duration::from_millis(250);

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
    /// Another role failed past its budget.
    JobFailed(Box<FailureSummary>),
}

impl Launch<'_> {
    pub(super) async fn run_attempt(
        &mut self,
        attempt: u32,
        placement: &[RankPlacement],
        remotes: &[Arc<RemoteHost>],
        resume: Option<&Path>,
        global_batch: usize,
    ) -> Result<AttemptEnd, LaunchError> {
        let spec = &self.loaded.spec;
        let Some(role) = spec.training_role() else { return Ok(AttemptEnd::Finished) };
        let role = role.name.clone();
        let first_attempt = self.attempts.len() == 1;
        let world_size = placement.len();
        let mut phase_start = Instant::now();
        self.coordinator.begin_attempt(&role, attempt, world_size);
        if !first_attempt {
            // The other roles reconnect to the new attempt.
            let payload = serde_json::json!({ "role": role, "attempt": attempt }).to_string();
            self.job.tell_every_role(&self.coordinator, "restarted", &payload);
        }
        self.job.progress.set_attempt(attempt, self.restarts.total());
        let logs = self.run.attempt_logs(attempt)?;
        let master_port = free_port().map_err(LaunchError::Coordinator)?;

        self.job.progress.set_phase("spawning");
        let (mut agent, mut exits) = Agent::new();
        let (command, reports) = match &self.opts.program {
            WorkerProgram::Runtime(cmd) => (cmd.clone(), true),
            WorkerProgram::External(cmd) => (cmd.clone(), false),
        };
        let max_restarts = spec.fault.max_restarts.saturating_add(spec.fault.max_user_restarts);
        let mut role_env = self.job.role_env(&role, attempt, max_restarts, world_size, master_port);
        role_env.global_batch = Some(global_batch);
        role_env.resume_from = resume.map(Path::to_path_buf);
        for p in placement {
            let launch = WorkerLaunch {
                id: ProcId::new(&role, p.rank),
                command: command.clone(),
                env: self.job.env_of(&role_env, p, placement, remotes, true),
                log_path: logs.join(format!("{role}-{}.log", p.rank)),
                echo: self.job.echo_of(&role, p.rank, matches!(self.opts.program, WorkerProgram::External(_))),
                cpus: if spec.device == DeviceKind::Cpu { pinned_cpus(p, &self.job.allowed_cpus) } else { Vec::new() },
                cwd: spec.working_dir.clone(),
            };
            if let Some(host) = p.node.checked_sub(1).and_then(|i| remotes.get(i)) {
                agent.spawn_on(host, launch);
            } else if let Err(e) = agent.spawn(launch) {
                agent.stop_all(STOP_GRACE, &mut exits).await;
                return Err(e.into());
            }
        }
        if first_attempt {
            self.startup.spawn_s = phase_start.elapsed().as_secs_f64();
        }
        phase_start = Instant::now();
        self.job.progress.set_phase(if reports { "rendezvous" } else { "running" });
        tracing::info!(attempt, workers = world_size, logs = %logs.display(), "workers started");

        let rendezvous_deadline = tokio::time::Instant::now() + spec.rendezvous_timeout;
        let mut gang_complete = !reports;
        let mut reported: Vec<FailureReport> = Vec::new();
        let mut finished = 0usize;
        let mut health = tokio::time::interval(HEALTH_TICK);
        let mut status = tokio::time::interval(STATUS_TICK);
        self.progressed.attempt_first = None;
        self.progressed.attempt_tokens = 0.0;

        let ending = loop {
            tokio::select! {
                Some(event) = self.events.recv() => match self.on_event(event) {
                    Some(CoordinatorEvent::Step(m)) => {
                        if first_attempt && self.startup.first_step_s.is_none() {
                            self.startup.first_step_s = Some(phase_start.elapsed().as_secs_f64());
                            self.startup.launch_to_first_step_s = Some(self.opts.started.elapsed().as_secs_f64());
                        }
                        self.record_step(&m, attempt);
                    }
                    Some(CoordinatorEvent::GangComplete { role: r }) if r == role => {
                        gang_complete = true;
                        if first_attempt {
                            self.startup.rendezvous_s = Some(phase_start.elapsed().as_secs_f64());
                        }
                        phase_start = Instant::now();
                        self.job.progress.set_phase("training");
                    }
                    Some(CoordinatorEvent::Failure(report)) => reported.push(report),
                    _ => {}
                },
                Some(exit) = exits.recv() => {
                    agent.reaped(&exit.id);
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
                    let (quick, patient) = (tokio::time::Instant::now() + SETTLE, tokio::time::Instant::now() + LOST_PEER_GRACE);
                    while !agent.live().is_empty() {
                        let deadline = if reports && only_lost_peers(&failed, &reported) { patient } else { quick };
                        tokio::select! {
                            Some(other) = exits.recv() => {
                                agent.reaped(&other.id);
                                if !other.kind.success() {
                                    failed.push(other);
                                }
                            }
                            Some(event) = self.events.recv() => match self.on_event(event) {
                                Some(CoordinatorEvent::Failure(report)) => reported.push(report),
                                Some(CoordinatorEvent::Step(m)) => self.record_step(&m, attempt),
                                _ => {}
                            },
                            _ = tokio::time::sleep_until(deadline) => break,
                        }
                    }
                    let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                    break Ending::WorkersFailed { failed, stopped, detected };
                },
                event = self.side.next() => {
                    match self.side.handle(event, &self.job, &self.coordinator).await {
                        Ok(SideState::Failed(summary)) => {
                            agent.stop_all(STOP_GRACE, &mut exits).await;
                            break Ending::JobFailed(summary);
                        }
                        Ok(_) => self.show_roles(),
                        Err(e) => {
                            agent.stop_all(STOP_GRACE, &mut exits).await;
                            return Err(e.into());
                        }
                    }
                },
                _ = status.tick() => self.write_status("running", attempt, &agent.whereabouts()),
                _ = health.tick(), if gang_complete => {
                    let timeout = spec.fault.heartbeat_timeout.as_secs_f64();
                    let hung = self.coordinator.heartbeats(&role).into_iter().find(|(_, (age, _))| *age > timeout);
                    if let Some((rank, (age, step))) = hung {
                        let detected = Instant::now();
                        agent.kill(&ProcId::new(&role, rank as usize));
                        let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                        break Ending::Hung { rank: rank as usize, age, step, stopped, detected };
                    }
                },
                _ = tokio::time::sleep_until(rendezvous_deadline), if !gang_complete => {
                    let missing = self.coordinator.missing_ranks(&role);
                    let detected = Instant::now();
                    let stopped = agent.stop_all(STOP_GRACE, &mut exits).await;
                    break Ending::RendezvousTimeout { missing, stopped, detected };
                },
                _ = self.sigint.recv() => {
                    self.stop_saving(&mut agent, &mut exits, "interrupted").await;
                    break Ending::Interrupted { signal: libc::SIGINT };
                },
                _ = self.sigterm.recv() => {
                    self.stop_saving(&mut agent, &mut exits, "terminated").await;
                    break Ending::Interrupted { signal: libc::SIGTERM };
                },
            }
        };
        // Steps and error reports sent right before the workers exited.
        while let Ok(event) = self.events.try_recv() {
            match self.on_event(event) {
                Some(CoordinatorEvent::Step(m)) => self.record_step(&m, attempt),
                Some(CoordinatorEvent::Failure(report)) => reported.push(report),
                _ => {}
            }
        }
        reported.retain(|r| r.id.as_ref().is_some_and(|id| id.attempt == attempt));
        let stopped_list = |stopped: &[WorkerExit]| stopped.iter().map(|e| format!("{} {}", e.id, e.kind)).collect();
        let spec = &self.loaded.spec;
        Ok(match ending {
            Ending::Finished => AttemptEnd::Finished,
            Ending::Interrupted { signal } => AttemptEnd::Interrupted { signal },
            Ending::JobFailed(summary) => AttemptEnd::JobFailed(*summary),
            Ending::WorkersFailed { failed, stopped, detected } => {
                let Some((cause, class)) = root_cause(&failed, &stopped, &reported) else {
                    return Ok(AttemptEnd::Finished);
                };
                let stopped_by_us = stopped.iter().any(|e| e.id == cause.id);
                let report =
                    reported.iter().find(|r| r.id.as_ref().is_some_and(|id| id.rank as usize == cause.id.rank));
                let signature = signature(&cause, report);
                let deterministic = report.is_some_and(|r| r.deterministic);
                let mut summary = failure_summary(&spec.name, attempt, &cause, stopped_by_us, &reported, &logs);
                summary.stopped = stopped_list(&stopped);
                AttemptEnd::Failed { summary, class, detected, signature, deterministic }
            }
            Ending::Hung { rank, age, step, stopped, detected } => {
                let log_path = logs.join(format!("{role}-{rank}.log"));
                let mut summary = FailureSummary::new(
                    &spec.name,
                    attempt,
                    format!(
                        "{role}:{rank} stopped responding: no heartbeat for {age:.1} s after step {step} \
                         (fault.heartbeat_timeout_s = {})",
                        spec.fault.heartbeat_timeout.as_secs_f64()
                    ),
                );
                summary.failed = Some(RankFailure::new(rank, "hung; killed by rtrain".into(), None, log_path));
                summary.stopped = stopped_list(&stopped);
                AttemptEnd::Failed {
                    summary,
                    class: FailureClass::Infrastructure,
                    detected,
                    signature: None,
                    deterministic: false,
                }
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
                AttemptEnd::Failed {
                    summary,
                    class: FailureClass::Infrastructure,
                    detected,
                    signature: None,
                    deterministic: false,
                }
            }
        })
    }

    /// Stops the gang at the user's request, within `fault.stop_grace_s` (then SIGKILL): workers
    /// of the rtrain runtime get SIGUSR1, on which they save a checkpoint at the end of their
    /// current step and exit; other programs get SIGTERM, the usual request to save and stop.
    /// A second Ctrl-C or SIGTERM stops them at once.
    async fn stop_saving(
        &mut self,
        agent: &mut Agent,
        exits: &mut tokio::sync::mpsc::UnboundedReceiver<WorkerExit>,
        why: &str,
    ) {
        let grace = self.loaded.spec.fault.stop_grace;
        let (signal, what) = match self.opts.program {
            WorkerProgram::Runtime(_) => (libc::SIGUSR1, "the workers save a checkpoint at the end of their step"),
            WorkerProgram::External(_) => (libc::SIGTERM, "the workers get SIGTERM"),
        };
        self.job.println(&format!(
            "{why}: {what} and exit (up to {} s, fault.stop_grace_s); Ctrl-C again stops them at once",
            grace.as_secs_f64()
        ));
        let (sigint, sigterm) = (&mut self.sigint, &mut self.sigterm);
        let again = tokio::select! {
            _ = agent.stop_all_with(signal, grace, exits) => false,
            _ = sigint.recv() => true,
            _ = sigterm.recv() => true,
        };
        if again {
            self.job.println("stopping at once");
            agent.stop_all(Duration::ZERO, exits).await;
        }
    }
}

/// Every rank that failed exited on its own with a code and reported (or has not yet reported)
/// only a lost peer: the rank that caused it has not shown itself yet.
fn only_lost_peers(failed: &[WorkerExit], reported: &[FailureReport]) -> bool {
    failed.iter().all(|e| {
        let report = reported.iter().find(|r| r.id.as_ref().is_some_and(|id| id.rank as usize == e.id.rank));
        matches!(e.kind, ExitKind::Code(_)) && report.is_none_or(|r| r.collective)
    })
}

/// The summary of a failed attempt whose root cause is `first`; `stopped_by_us`: rtrain stopped it
/// while it was failing on its own (its reported error says what happened).
fn failure_summary(
    job: &str,
    attempt: u32,
    first: &WorkerExit,
    stopped_by_us: bool,
    reported: &[FailureReport],
    logs: &Path,
) -> FailureSummary {
    let log_path = logs.join(format!("{}-{}.log", first.id.role, first.id.rank));
    let error = reported.iter().find(|r| r.id.as_ref().is_some_and(|id| id.rank as usize == first.id.rank));
    let how =
        if stopped_by_us { "failed (its error below; rtrain stopped it)".to_string() } else { describe(first.kind) };
    let mut summary = FailureSummary::new(job, attempt, format!("{} {how}", first.id));
    summary.failed = Some(RankFailure::new(first.id.rank, first.kind.to_string(), error, log_path));
    summary
}
