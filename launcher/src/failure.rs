//! The one-screen root-cause summary of a failed attempt.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// The rank whose failure ended the attempt.
#[derive(Debug, Clone, Serialize)]
pub struct RankFailure {
    pub rank: usize,
    /// "exit code 1" or "signal 9 (SIGKILL)".
    pub exit: String,
    /// The structured error the worker reported, if it could.
    pub error: Option<String>,
    pub backtrace: Option<String>,
    pub log_path: PathBuf,
    pub log_tail: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailureSummary {
    pub job: String,
    pub attempt: u32,
    pub root_cause: String,
    pub failed: Option<RankFailure>,
    /// Other workers and how they ended when rtrain stopped them.
    pub stopped: Vec<String>,
    /// Causes of the earlier attempts of this launch, oldest first.
    pub previous_attempts: Vec<String>,
    /// Why no restart followed, when a restart budget was spent.
    pub budget: Option<String>,
}

impl RankFailure {
    /// The failed rank as its exit, its reported error (if it reported one) and the end of its
    /// log show it.
    pub fn new(rank: usize, exit: String, report: Option<&crate::proto::FailureReport>, log_path: PathBuf) -> Self {
        Self {
            rank,
            exit,
            error: report.map(|r| r.message.clone()),
            backtrace: report.map(|r| r.backtrace.clone()).filter(|b| !b.is_empty()),
            log_tail: crate::agent::log_tail(&log_path, 15),
            log_path,
        }
    }
}

impl FailureSummary {
    pub fn new(job: &str, attempt: u32, root_cause: String) -> Self {
        Self {
            job: job.into(),
            attempt,
            root_cause,
            failed: None,
            stopped: Vec::new(),
            previous_attempts: Vec::new(),
            budget: None,
        }
    }
}

impl fmt::Display for FailureSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "job {} failed in attempt {}", self.job, self.attempt)?;
        writeln!(f, "  root cause: {}", self.root_cause)?;
        if let Some(r) = &self.failed {
            if let Some(error) = &r.error {
                writeln!(f, "  error: {error}")?;
            }
            if !r.log_tail.is_empty() {
                writeln!(f, "  last lines of {}:", r.log_path.display())?;
                for line in &r.log_tail {
                    writeln!(f, "    | {line}")?;
                }
            } else {
                writeln!(f, "  log: {} (empty)", r.log_path.display())?;
            }
        }
        if !self.stopped.is_empty() {
            writeln!(f, "  stopped by rtrain: {}", self.stopped.join(", "))?;
        }
        if !self.previous_attempts.is_empty() {
            writeln!(f, "  earlier attempts:")?;
            for line in &self.previous_attempts {
                writeln!(f, "    {line}")?;
            }
        }
        if let Some(budget) = &self.budget {
            writeln!(f, "  {budget}")?;
        }
        Ok(())
    }
}
