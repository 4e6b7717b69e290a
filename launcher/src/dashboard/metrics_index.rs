//! Incremental reading of a run's `metrics.jsonl` while the launch appends to it: where each
//! complete line starts, and the latest value of every metric, for the dashboard's charts and
//! the Prometheus endpoint. A line counts once its newline is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde_json::Value;

/// Columns of a metrics line that are bookkeeping, not metrics.
const NOT_METRICS: [&str; 6] = ["role", "rank", "step", "time", "attempt", "restarts"];

#[derive(Debug)]
pub struct MetricsIndex {
    path: PathBuf,
    /// Byte offset where each complete line starts.
    starts: Vec<u64>,
    /// Byte offset just after the last complete line.
    end: u64,
    /// The latest value of each `(role, metric)`, and the step it came with.
    latest: BTreeMap<(String, String), (u64, f64)>,
}

impl MetricsIndex {
    pub fn new(path: PathBuf) -> Self {
        Self { path, starts: Vec::new(), end: 0, latest: BTreeMap::new() }
    }

    /// Takes in the lines completed since the last call. A missing file is an empty one (the
    /// launch writes the first line with the first step).
    pub fn refresh(&mut self) -> std::io::Result<()> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() < self.end {
            // Rewritten from the start (`--fresh`): read it again.
            *self = Self::new(self.path.clone());
        }
        file.seek(SeekFrom::Start(self.end))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh)?;
        let mut start = 0;
        while let Some(len) = fresh[start..].iter().position(|&b| b == b'\n') {
            let line = &fresh[start..start + len];
            self.starts.push(self.end + start as u64);
            if let Ok(row) = serde_json::from_slice::<Value>(line) {
                self.take_latest(&row);
            }
            start += len + 1;
        }
        self.end += start as u64;
        Ok(())
    }

    fn take_latest(&mut self, row: &Value) {
        let Some(fields) = row.as_object() else { return };
        let role = fields.get("role").and_then(Value::as_str).unwrap_or("trainer");
        let step = fields.get("step").and_then(Value::as_u64).unwrap_or(0);
        for (name, value) in fields {
            if let Some(v) = value.as_f64().filter(|_| !NOT_METRICS.contains(&name.as_str())) {
                self.latest.insert((role.to_string(), name.clone()), (step, v));
            }
        }
    }

    /// Complete lines so far.
    #[cfg(test)]
    pub fn line_count(&self) -> usize {
        self.starts.len()
    }

    /// Lines `from..` (at most `max` of them) as JSON values, and the number of the line after
    /// the last one returned. Lines that are not JSON are left out.
    pub fn rows(&self, from: usize, max: usize) -> std::io::Result<(usize, Vec<Value>)> {
        let from = from.min(self.starts.len());
        let upto = from.saturating_add(max).min(self.starts.len());
        if from == upto {
            return Ok((from, Vec::new()));
        }
        let begin = self.starts[from];
        let stop = self.starts.get(upto).copied().unwrap_or(self.end);
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(begin))?;
        let mut bytes = vec![0; (stop - begin) as usize];
        file.read_exact(&mut bytes)?;
        let rows = bytes.split(|&b| b == b'\n').filter_map(|line| serde_json::from_slice(line).ok()).collect();
        Ok((upto, rows))
    }

    /// The latest value of each `(role, metric)` with its step.
    pub fn latest(&self) -> &BTreeMap<(String, String), (u64, f64)> {
        &self.latest
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn reads_complete_lines_as_they_are_appended() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("metrics.jsonl");
        let mut index = MetricsIndex::new(path.clone());
        index.refresh()?;
        assert_eq!(index.line_count(), 0);

        let mut file = File::create(&path)?;
        write!(file, "{{\"role\":\"trainer\",\"step\":1,\"loss\":2.5}}\n{{\"role\":\"trainer\",\"step\":2,\"lo")?;
        index.refresh()?;
        assert_eq!(index.line_count(), 1, "a line without its newline is not complete");
        writeln!(file, "ss\":2.0,\"grad_norm\":null}}")?;
        writeln!(file, "{{\"role\":\"rollout\",\"rank\":1,\"step\":7,\"reward_mean\":0.25}}")?;
        index.refresh()?;
        assert_eq!(index.line_count(), 3);

        let (next, rows) = index.rows(1, 10)?;
        assert_eq!(next, 3);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["loss"], 2.0);
        let (next, rows) = index.rows(0, 1)?;
        assert_eq!((next, rows.len()), (1, 1));
        assert_eq!(index.rows(3, 10)?.1.len(), 0);
        assert_eq!(index.rows(99, 10)?.0, 3, "a position past the end is the end");

        let latest = index.latest();
        assert_eq!(latest.get(&("trainer".into(), "loss".into())), Some(&(2, 2.0)));
        assert_eq!(latest.get(&("rollout".into(), "reward_mean".into())), Some(&(7, 0.25)));
        assert!(!latest.contains_key(&("rollout".into(), "rank".into())), "bookkeeping columns are not metrics");
        assert!(!latest.contains_key(&("trainer".into(), "grad_norm".into())), "null is no value");
        Ok(())
    }

    #[test]
    fn a_rewritten_file_is_read_again() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":1.0}\n{\"step\":2,\"loss\":0.5}\n")?;
        let mut index = MetricsIndex::new(path.clone());
        index.refresh()?;
        assert_eq!(index.line_count(), 2);
        std::fs::write(&path, "{\"step\":1,\"loss\":9.0}\n")?;
        index.refresh()?;
        assert_eq!(index.line_count(), 1);
        assert_eq!(index.rows(0, 5)?.1[0]["loss"], 9.0);
        Ok(())
    }
}
