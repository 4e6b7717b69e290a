//! The run directory `<run_dir>/<name>/`: effective config, per-attempt logs, metrics.jsonl
//! and summary.json.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::JobConfig;
use crate::proto::{MetricsReport, StepMetrics};
use crate::run_lock::{RunLock, RunLockError};
use crate::tensorboard::EventWriter;
use serde::Serialize;

/// The run's metrics, one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// How the run ended, written when its launch ends.
pub const SUMMARY_FILE: &str = "summary.json";

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error(
        "{} holds a finished run without checkpoints to continue from; pass --fresh to run it again \
         (the old run is kept beside it as {}), or choose another job.name", path.display(), moved_to.display()
    )]
    Exists { path: PathBuf, moved_to: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Locked(#[from] RunLockError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io { path: path.to_path_buf(), source }
}

/// An opened run directory.
pub struct RunDir {
    pub path: PathBuf,
    metrics: File,
    /// metrics.jsonl's length after its last whole line: a line that fails half-way (a full
    /// disk) is cut back to it, so the file never ends in a partial line.
    metrics_len: u64,
    /// TensorBoard events of every metric (`[metrics] tensorboard = true`).
    events: Option<EventWriter>,
    /// Held for as long as the run directory is open: a second launch on it is refused.
    /// Where an earlier run was moved aside by this launch.
    moved_aside: Option<PathBuf>,
    _lock: RunLock,
}

/// `<name>.prev-<unix seconds>` beside `path`, with `-2`, `-3`... when several starts over fall in
/// the same second.
fn aside_name(path: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let first = path.with_file_name(format!("{name}.prev-{stamp}"));
    std::iter::once(first)
        .chain((2..).map(|n| path.with_file_name(format!("{name}.prev-{stamp}-{n}"))))
        .find(|p| !p.exists())
        .unwrap_or_else(|| path.with_file_name(format!("{name}.prev-{stamp}")))
}

impl RunDir {
    /// Opens the run directory and writes the effective config. An earlier run there with
    /// checkpoints is continued (metrics are appended); one without is moved aside (never
    /// deleted) and this one starts over, unless it finished, which only `fresh` runs again.
    /// With `fresh` any earlier run is moved aside.
    /// The directory is locked first (see [`RunLock`]): a launch already running there is named
    /// and nothing is touched.
    pub fn open(path: &Path, config: &JobConfig, fresh: bool) -> Result<Self, RunDirError> {
        std::fs::create_dir_all(path).map_err(io(path))?;
        let mut lock = RunLock::acquire(path)?;
        let has_checkpoints = !crate::checkpoint::list(path)
            .map_err(|e| RunDirError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })?
            .is_empty();
        let continuing = has_checkpoints && !fresh;
        let mut moved_aside = None;
        if !continuing && (path.join(METRICS_FILE).exists() || has_checkpoints) {
            let moved_to = aside_name(path);
            let finished = std::fs::read_to_string(path.join(SUMMARY_FILE))
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .is_some_and(|s| s["status"] == "finished");
            if finished && !fresh {
                return Err(RunDirError::Exists { path: path.to_path_buf(), moved_to });
            }
            std::fs::rename(path, &moved_to).map_err(io(path))?;
            moved_aside = Some(moved_to);
            // The old lock went aside with the old run; this run's is in the new directory.
            std::fs::create_dir_all(path).map_err(io(path))?;
            lock = RunLock::acquire(path)?;
        }
        let config_path = path.join("config.toml");
        let text = toml::to_string(config)
            .map_err(|e| RunDirError::Io { path: config_path.clone(), source: std::io::Error::other(e) })?;
        std::fs::write(&config_path, text).map_err(io(&config_path))?;
        let metrics_path = path.join(METRICS_FILE);
        let metrics = File::options().create(true).append(true).open(&metrics_path).map_err(io(&metrics_path))?;
        let metrics_len = metrics.metadata().map_err(io(&metrics_path))?.len();
        let events = if config.metrics.tensorboard {
            let dir = path.join("tensorboard");
            Some(EventWriter::create(&dir).map_err(io(&dir))?)
        } else {
            None
        };
        Ok(Self { path: path.to_path_buf(), metrics, metrics_len, events, moved_aside, _lock: lock })
    }

    /// Where an earlier run in this directory was moved, when this launch started over.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.moved_aside.as_deref()
    }

    /// The number the next attempt gets: attempts continue across launches of the same run, so
    /// earlier attempts' logs are kept.
    pub fn next_attempt(&self) -> u32 {
        let Ok(entries) = std::fs::read_dir(self.path.join("logs")) else { return 0 };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("attempt-")?.parse::<u32>().ok())
            .map(|n| n + 1)
            .max()
            .unwrap_or(0)
    }

    /// Whether the summary.json left by an earlier launch says it finished (not failed,
    /// interrupted or killed before writing one).
    pub fn finished_before(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(self.path.join(SUMMARY_FILE)) else { return false };
        serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|s| s["status"] == "finished")
    }

    /// The effective config the workers read.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.toml")
    }

    /// `logs/attempt-N/`, created on demand.
    pub fn attempt_logs(&self, attempt: u32) -> Result<PathBuf, RunDirError> {
        let dir = self.path.join("logs").join(format!("attempt-{attempt}"));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// Writes scalars to the TensorBoard events, when the run keeps them.
    fn write_events(&mut self, step: u64, time: f64, scalars: Vec<(String, f64)>) -> Result<(), RunDirError> {
        let Some(events) = &mut self.events else { return Ok(()) };
        let path = events.path().to_path_buf();
        events.scalars(step, time, scalars).map_err(io(&path))
    }

    /// Appends one step to metrics.jsonl; flushed so a crash loses nothing already reported.
    pub fn record_step(&mut self, m: &StepMetrics, attempt: u32, restarts: u32) -> Result<(), RunDirError> {
        let line = MetricsLine {
            role: m.id.as_ref().map_or("trainer", |id| id.role.as_str()),
            step: m.step,
            loss: m.loss,
            lr: m.lr,
            tokens_per_s: m.tokens_per_s,
            time: m.time,
            grad_norm: m.grad_norm,
            step_time_s: m.step_time_s,
            attempt,
            restarts,
            checkpoint_stall_s: m.checkpoint_stall_s,
            extra: &m.extra,
        };
        self.append_line(&line)?;
        let fixed = [
            ("loss", m.loss),
            ("lr", m.lr),
            ("tokens_per_s", m.tokens_per_s),
            ("grad_norm", m.grad_norm),
            ("step_time_s", m.step_time_s),
        ];
        let role = line.role.to_string();
        let scalars =
            fixed.into_iter().map(|(k, v)| (k.to_string(), v)).chain(m.extra.iter().map(|(k, v)| (k.clone(), *v)));
        self.write_events(m.step, m.time, scalars.map(|(k, v)| (format!("{role}/{k}"), v)).collect())
    }

    /// Appends the named metrics of any role's process to metrics.jsonl:
    /// `{"role", "rank", "attempt", "step", "time", <name>: <value>...}`.
    pub fn record_metrics(&mut self, m: &MetricsReport) -> Result<(), RunDirError> {
        let Some(id) = &m.id else { return Ok(()) };
        let line = RoleMetricsLine {
            role: &id.role,
            rank: id.rank,
            attempt: id.attempt,
            step: m.step,
            time: m.time,
            metrics: &m.metrics,
        };
        self.append_line(&line)?;
        let prefix = if id.rank == 0 { id.role.clone() } else { format!("{}/{}", id.role, id.rank) };
        let scalars = m.metrics.iter().map(|(k, v)| (format!("{prefix}/{k}"), *v)).collect();
        self.write_events(m.step, m.time, scalars)
    }

    /// One whole JSON line in one write, so a crash loses nothing already reported; a write
    /// that fails half-way is cut back, leaving the file's earlier lines whole.
    fn append_line(&mut self, line: &impl Serialize) -> Result<(), RunDirError> {
        let path = self.path.join(METRICS_FILE);
        let text = serde_json::to_string(line).map_err(|e| RunDirError::Io { path: path.clone(), source: e.into() })?;
        let bytes = format!("{text}\n");
        match self.metrics.write_all(bytes.as_bytes()) {
            Ok(()) => {
                self.metrics_len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let cut = self.metrics.set_len(self.metrics_len);
                let what = match cut {
                    Ok(()) => "this line was not written",
                    Err(_) => "this line may be cut short",
                };
                Err(RunDirError::Io { path, source: std::io::Error::new(e.kind(), format!("{e} ({what})")) })
            }
        }
    }

    /// Writes summary.json by rename, so it is whole or absent; a write that fails leaves no
    /// partial temporary file behind.
    pub fn write_summary(&self, summary: &impl Serialize) -> Result<(), RunDirError> {
        let path = self.path.join(SUMMARY_FILE);
        let tmp = self.path.join("summary.json.tmp");
        let text = serde_json::to_string_pretty(summary)
            .map_err(|e| RunDirError::Io { path: path.clone(), source: e.into() })?;
        let written = std::fs::write(&tmp, text + "\n")
            .map_err(io(&path))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(io(&path)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

#[derive(Serialize)]
struct MetricsLine<'a> {
    role: &'a str,
    step: u64,
    loss: f64,
    lr: f64,
    tokens_per_s: f64,
    /// Unix seconds when the optimizer step finished.
    time: f64,
    grad_norm: f64,
    step_time_s: f64,
    attempt: u32,
    /// Restarts of this launch so far.
    restarts: u32,
    /// Set on steps that saved a checkpoint: the step loop's stall for the save, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_stall_s: Option<f64>,
    /// Further named metrics of the step.
    #[serde(flatten)]
    extra: &'a std::collections::HashMap<String, f64>,
}

#[derive(Serialize)]
struct RoleMetricsLine<'a> {
    role: &'a str,
    rank: u32,
    attempt: u32,
    step: u64,
    time: f64,
    #[serde(flatten)]
    metrics: &'a std::collections::HashMap<String, f64>,
}
