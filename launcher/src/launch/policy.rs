//! The launcher's decisions, as pure functions: which failure caused the others, which budget
//! it counts against, whether and when to restart. The supervision loops only carry them out.

use std::time::Duration;

use serde::Serialize;

use crate::agent::{ExitKind, WorkerExit};
use crate::config::{FaultSpec, RoleSpec};
use crate::proto::FailureReport;

/// Longest wait before restarting a process of a role that restarts alone.
const MAX_ALONE_BACKOFF: Duration = Duration::from_secs(30);

/// Which restart budget a failure counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// A worker killed by a signal, hung, or lost: the machine's or the platform's doing.
    Infrastructure,
    /// The training code failed: an error, a panic, a non-zero exit.
    User,
}

/// Restarts of the training gang used so far, per budget.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restarts {
    pub infrastructure: u32,
    pub user: u32,
}

impl Restarts {
    pub fn total(&self) -> u32 {
        self.infrastructure + self.user
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, PartialEq)]
pub enum RestartDecision {
    /// Restart after `delay`; this is restart `used` of `budget` (the config key `key`).
    Restart { delay: Duration, used: u32, budget: u32, key: String },
    /// No restart left: end the job, saying why.
    GiveUp { reason: String },
}

/// The failure that caused the others, and its budget: a worker killed by a signal first, then
/// one whose own code failed, then one rtrain `stopped` while it was failing on its own (it had
/// reported an error that is not a lost peer), and only then one that merely lost a peer.
pub fn root_cause(
    failed: &[WorkerExit],
    stopped: &[WorkerExit],
    reported: &[FailureReport],
) -> Option<(WorkerExit, FailureClass)> {
    let report = |e: &WorkerExit| {
        reported.iter().find(|r| r.id.as_ref().is_some_and(|id| id.role == e.id.role && id.rank as usize == e.id.rank))
    };
    if let Some(e) = failed.iter().find(|e| matches!(e.kind, ExitKind::Signal(_) | ExitKind::Lost)) {
        return Some((e.clone(), FailureClass::Infrastructure));
    }
    if let Some(e) = failed.iter().find(|e| !report(e).is_some_and(|r| r.collective)) {
        return Some((e.clone(), FailureClass::User));
    }
    if let Some(e) = stopped.iter().find(|e| report(e).is_some_and(|r| !r.collective)) {
        return Some((e.clone(), FailureClass::User));
    }
    failed.first().map(|e| (e.clone(), FailureClass::Infrastructure))
}

/// After a failed attempt of the training gang: restart within the budget of the failure's
/// class, backing off exponentially over `streak` failures in a row (an attempt that trained
/// resets it to 1). Counts the restart in `used` when there is one.
pub fn gang_restart(class: FailureClass, used: &mut Restarts, fault: &FaultSpec, streak: u32) -> RestartDecision {
    let (count, budget, key, what) = match class {
        FailureClass::Infrastructure => {
            (&mut used.infrastructure, fault.max_restarts, "fault.max_restarts", "infrastructure")
        }
        FailureClass::User => (&mut used.user, fault.max_user_restarts, "fault.max_user_restarts", "training code"),
    };
    if *count >= budget {
        return RestartDecision::GiveUp {
            reason: format!("no restart left: {count} of {key} = {budget} used ({what} failure)"),
        };
    }
    *count += 1;
    RestartDecision::Restart { delay: fault.backoff_before(streak), used: *count, budget, key: key.to_string() }
}

/// A failed attempt of the training gang, as the restart decision sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GangFailure {
    pub class: FailureClass,
    /// How the root cause failed, to compare attempts: see [`signature`].
    pub signature: Option<String>,
    /// The worker said a restart fails the same way (a non-finite loss replays identically).
    pub deterministic: bool,
    /// Whether the attempt completed a step; `None` for a program that reports no steps.
    pub trained: Option<bool>,
}

/// How the root cause `cause` failed, without its rank (whichever rank fails first, a
/// configuration error fails them all): its exit and its reported error. `None` for signals that
/// come from outside the process (a kill, a stop by rtrain), which say nothing of the next
/// attempt.
pub fn signature(cause: &WorkerExit, report: Option<&FailureReport>) -> Option<String> {
    if let ExitKind::Signal(libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP) | ExitKind::Lost = cause.kind {
        return None;
    }
    Some(match report {
        Some(r) => format!("{}: {}", cause.kind, r.message),
        None => cause.kind.to_string(),
    })
}

/// Why restarting after `failure` cannot help, if it cannot: the worker said so, or the attempt
/// failed exactly as the one before it (`previous`) without completing a step in between.
pub fn will_repeat(failure: &GangFailure, previous: Option<&GangFailure>) -> Option<String> {
    if failure.deterministic {
        return Some("not restarted: this failure is deterministic, a restart would fail the same way".into());
    }
    let previous = previous?;
    match (&failure.signature, &previous.signature, failure.trained) {
        (Some(now), Some(before), Some(false)) if now == before => Some(format!(
            "not restarted: the same failure as the attempt before ({now}) with no step completed in between;              a restart would repeat it"
        )),
        _ => None,
    }
}

/// After a failed attempt of the training gang: give up if a restart would fail the same way
/// (see [`will_repeat`]), else as [`gang_restart`] says. `previous` is the attempt before it.
pub fn after_gang_failure(
    failure: &GangFailure,
    previous: Option<&GangFailure>,
    used: &mut Restarts,
    fault: &FaultSpec,
    streak: u32,
) -> RestartDecision {
    match will_repeat(failure, previous) {
        Some(reason) => RestartDecision::GiveUp { reason },
        None => gang_restart(failure.class, used, fault, streak),
    }
}

/// After a process of `role` failed (or, for a gang role, the role): restart while the role's
/// budget lasts, `used` restarts being spent so far and `in_a_row` failures (this one included)
/// having come without the process running steadily in between.
pub fn role_restart(role: &RoleSpec, used: u32, in_a_row: u32) -> RestartDecision {
    let key = role.key("max_restarts");
    if used >= role.max_restarts {
        return RestartDecision::GiveUp {
            reason: format!("no restart left: {used} of {key} = {} used", role.max_restarts),
        };
    }
    let factor = 2f64.powi(in_a_row.saturating_sub(1).min(30) as i32);
    RestartDecision::Restart {
        delay: role.backoff.mul_f64(factor).min(MAX_ALONE_BACKOFF),
        used: used + 1,
        budget: role.max_restarts,
        key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ProcId;
    use crate::config::RestartMode;
    use crate::proto::WorkerId;

    fn exit(rank: usize, kind: ExitKind) -> WorkerExit {
        WorkerExit { id: ProcId::new("trainer", rank), kind }
    }

    fn report(rank: u32, collective: bool) -> FailureReport {
        FailureReport {
            id: Some(WorkerId { role: "trainer".into(), rank, attempt: 0 }),
            message: "x".into(),
            backtrace: String::new(),
            collective,
            deterministic: false,
        }
    }

    #[test]
    fn a_signal_is_the_root_cause_before_errors_and_lost_peers() {
        let failed = [exit(0, ExitKind::Code(1)), exit(1, ExitKind::Signal(9)), exit(2, ExitKind::Code(1))];
        let (e, class) = root_cause(&failed, &[], &[report(0, true), report(2, false)]).unwrap();
        assert_eq!((e.id.rank, class), (1, FailureClass::Infrastructure));

        // No signal: the rank whose own code failed, not the one that lost a peer.
        let failed = [exit(0, ExitKind::Code(1)), exit(2, ExitKind::Code(1))];
        let (e, class) = root_cause(&failed, &[], &[report(0, true), report(2, false)]).unwrap();
        assert_eq!((e.id.rank, class), (2, FailureClass::User));

        // Only lost peers: the first, as infrastructure.
        let (e, class) = root_cause(&failed, &[], &[report(0, true), report(2, true)]).unwrap();
        assert_eq!((e.id.rank, class), (0, FailureClass::Infrastructure));
        assert!(root_cause(&[], &[], &[]).is_none());

        // A rank stopped by rtrain while it was failing on its own (it reported its error)
        // caused the lost peers, not them; a stopped rank with no error of its own did not.
        let lost = [exit(1, ExitKind::Code(1))];
        let stopped = [exit(0, ExitKind::Signal(15)), exit(2, ExitKind::Signal(15))];
        let (e, class) = root_cause(&lost, &stopped, &[report(1, true), report(2, false)]).unwrap();
        assert_eq!((e.id.rank, class), (2, FailureClass::User));
        let (e, class) = root_cause(&lost, &stopped, &[report(1, true), report(0, true)]).unwrap();
        assert_eq!((e.id.rank, class), (1, FailureClass::Infrastructure));
    }

    fn fault(max_restarts: u32, max_user_restarts: u32) -> FaultSpec {
        FaultSpec {
            max_restarts,
            max_user_restarts,
            heartbeat_timeout: Duration::from_secs(30),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
            stop_grace: Duration::from_secs(60),
        }
    }

    #[test]
    fn gang_restarts_spend_the_budget_of_their_class_with_backoff() {
        let f = fault(2, 1);
        let mut used = Restarts::default();
        let d = gang_restart(FailureClass::Infrastructure, &mut used, &f, 1);
        assert_eq!(
            d,
            RestartDecision::Restart {
                delay: Duration::from_millis(100),
                used: 1,
                budget: 2,
                key: "fault.max_restarts".into()
            }
        );
        let RestartDecision::Restart { delay, .. } = gang_restart(FailureClass::Infrastructure, &mut used, &f, 3)
        else {
            panic!("budget left")
        };
        assert_eq!(delay, Duration::from_millis(250), "400 ms capped at max_backoff");
        let d = gang_restart(FailureClass::Infrastructure, &mut used, &f, 4);
        assert!(matches!(&d, RestartDecision::GiveUp { reason } if reason.contains("2 of fault.max_restarts = 2")));
        // The user budget is separate.
        assert!(matches!(gang_restart(FailureClass::User, &mut used, &f, 1), RestartDecision::Restart { used: 1, .. }));
        let d = gang_restart(FailureClass::User, &mut used, &f, 1);
        assert!(matches!(&d, RestartDecision::GiveUp { reason } if reason.contains("training code")));
        assert_eq!(used, Restarts { infrastructure: 2, user: 1 });
    }

    fn gang_failure(signature: Option<&str>, trained: Option<bool>) -> GangFailure {
        GangFailure {
            class: FailureClass::Infrastructure,
            signature: signature.map(str::to_string),
            deterministic: false,
            trained,
        }
    }

    #[test]
    fn a_failure_that_will_repeat_ends_the_run_without_spending_a_restart() {
        let f = fault(3, 3);
        let mut used = Restarts::default();
        let abort = gang_failure(Some("signal 6 (SIGABRT)"), Some(false));
        // The first time it may be the machine's doing: restart.
        assert!(matches!(after_gang_failure(&abort, None, &mut used, &f, 1), RestartDecision::Restart { .. }));
        // The same way again, no step done since: give up, saying why, with the budget left.
        let d = after_gang_failure(&abort, Some(&abort), &mut used, &f, 2);
        assert!(
            matches!(&d, RestartDecision::GiveUp { reason } if reason.contains("the same failure as the attempt before (signal 6 (SIGABRT))")),
            "{d:?}"
        );
        assert_eq!(used.total(), 1);
        // A step done in between, another failure, or a program that reports no steps: restart.
        let trained = gang_failure(Some("signal 6 (SIGABRT)"), Some(true));
        assert!(will_repeat(&trained, Some(&abort)).is_none());
        assert!(will_repeat(&gang_failure(Some("exit code 1: disk"), Some(false)), Some(&abort)).is_none());
        let external = gang_failure(Some("exit code 3"), None);
        assert!(will_repeat(&external, Some(&external)).is_none());
        // Kills from outside compare as nothing: kill -9 twice in a row is restarted twice.
        let killed = gang_failure(None, Some(false));
        assert!(will_repeat(&killed, Some(&killed)).is_none());
        // A worker that says its failure is deterministic is not restarted even once.
        let nan = GangFailure { deterministic: true, ..gang_failure(Some("exit code 1: step 2: NaN"), Some(false)) };
        let d = after_gang_failure(&nan, None, &mut used, &f, 1);
        assert!(matches!(&d, RestartDecision::GiveUp { reason } if reason.contains("deterministic")), "{d:?}");
        assert_eq!(used.total(), 1);
    }

    #[test]
    fn a_signature_names_the_exit_and_error_but_not_the_rank() {
        let mut r = report(1, false);
        r.message = "out of memory".into();
        let a = signature(&exit(0, ExitKind::Code(1)), Some(&r));
        assert_eq!(a.as_deref(), Some("exit code 1: out of memory"));
        assert_eq!(
            signature(&exit(1, ExitKind::Signal(libc::SIGABRT)), None),
            signature(&exit(0, ExitKind::Signal(libc::SIGABRT)), None)
        );
        for sig in [libc::SIGKILL, libc::SIGTERM, libc::SIGINT] {
            assert_eq!(signature(&exit(0, ExitKind::Signal(sig)), None), None);
        }
    }

    fn actor(max_restarts: u32) -> RoleSpec {
        RoleSpec {
            name: "actor".into(),
            size: 2,
            min_size: 2,
            program: crate::config::RoleProgram::Command(vec!["true".into()]),
            restart: RestartMode::Alone,
            cpus_per_worker: 0.5,
            gpus_per_worker: 0,
            on_training_gpus: false,
            max_restarts,
            backoff: Duration::from_secs(1),
            training: false,
        }
    }

    #[test]
    fn role_restarts_back_off_per_failure_in_a_row_and_stop_at_the_budget() {
        let role = actor(3);
        let delays: Vec<Duration> = (1..=7)
            .map(|n| match role_restart(&actor(100), 0, n) {
                RestartDecision::Restart { delay, .. } => delay,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(delays[..3], [Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(4)]);
        assert_eq!(delays[6], MAX_ALONE_BACKOFF);
        assert!(matches!(role_restart(&role, 2, 1), RestartDecision::Restart { used: 3, budget: 3, .. }));
        let d = role_restart(&role, 3, 1);
        assert!(
            matches!(&d, RestartDecision::GiveUp { reason } if reason.contains("3 of roles.actor.max_restarts = 3")),
            "{d:?}"
        );
    }
}
