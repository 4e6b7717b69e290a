//! What a launch writes to `summary.json`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::policy::FailureClass;
use crate::failure::FailureSummary;

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

/// One attempt of the training gang.
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

/// A restart within a role: of one process (`rank`), or of the whole role (`rank` absent).
#[derive(Debug, Clone, Serialize)]
pub struct RoleAttempt {
    /// The attempt (or the process's incarnation) that ended.
    pub number: u32,
    pub rank: Option<usize>,
    pub cause: String,
    /// Failure detected → the process (or role) started again.
    pub recovery_s: Option<f64>,
}

/// `summary.json`'s entry for one role.
#[derive(Debug, Clone, Serialize)]
pub struct RoleSummary {
    pub size: usize,
    pub restarts: u32,
    pub attempts: Vec<RoleAttempt>,
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
    /// Every role of the job, the training role included.
    pub roles: BTreeMap<String, RoleSummary>,
    /// RL runs: held-out scores before and after training (`eval_before`, `eval_after`), as
    /// the trainer recorded them in the run directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rl: Option<serde_json::Value>,
    /// Reward-model and DPO runs: held-out pair scores before and after training (`eval_before`,
    /// `eval_after`: accuracy, margin, loss, rewards), as the trainer recorded them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<serde_json::Value>,
}
