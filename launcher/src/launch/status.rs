//! `<run>/status.json`: what a live launch is doing, rewritten every second, for `rtrain status`
//! and anything else that looks at a run from outside (its last write also says how it ended).

use serde_json::{Value, json};

use super::Launch;
use crate::agent::{ProcId, Whereabouts};
use crate::contract::unix_now;

/// The file in the run directory.
pub const STATUS_FILE: &str = "status.json";

/// This machine's name, where every process of a launch runs.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "localhost".into(), |h| h.trim().to_string())
}

impl Launch<'_> {
    /// Writes the run's state (`running`, or how it ended) with every role's processes: pid,
    /// last heartbeat and step. Best effort: a status that cannot be written is not worth
    /// stopping training for.
    pub(super) fn write_status(&self, state: &str, attempt: u32, trainer: &[(ProcId, Whereabouts)]) {
        let spec = &self.loaded.spec;
        let mut procs = trainer.to_vec();
        procs.extend(self.side.pids().into_iter().map(|(id, pid)| (id, Whereabouts::Here(pid))));
        let here = host_name();
        let roles: serde_json::Map<String, Value> = spec
            .roles
            .iter()
            .map(|role| {
                let beats = self.coordinator.heartbeats(&role.name);
                let ranks: Vec<Value> = (0..role.size)
                    .map(|rank| {
                        let at = procs.iter().find(|(id, _)| id.role == role.name && id.rank == rank).map(|p| &p.1);
                        let (pid, host) = match at {
                            Some(Whereabouts::Here(pid)) => (Some(*pid), here.as_str()),
                            Some(Whereabouts::On(host)) => (None, host.as_str()),
                            None => (None, here.as_str()),
                        };
                        let beat = beats.get(&(rank as u32));
                        json!({
                            "rank": rank,
                            "host": host,
                            "pid": pid,
                            "state": if at.is_some() { "running" } else { "not running" },
                            "heartbeat_age_s": beat.map(|b| b.0),
                            "step": beat.map(|b| b.1),
                        })
                    })
                    .collect();
                (role.name.clone(), json!({ "size": role.size, "ranks": ranks }))
            })
            .collect();
        let p = &self.progressed;
        let (step, loss) = p.last_step.map_or((None, None), |(s, l, _)| (Some(s), Some(l)));
        // Throughput and ETA over the current attempt's steps.
        let rate = match (p.attempt_first, p.last_step) {
            (Some((s0, t0)), Some((s1, _, t1))) if t1 > t0 && s1 > s0 => {
                Some(((s1 - s0) as f64 / (t1 - t0), p.attempt_tokens / (t1 - t0)))
            }
            _ => None,
        };
        let eta = rate.zip(step).map(|((per_s, _), s)| spec.steps.saturating_sub(s) as f64 / per_s);
        let status = json!({
            "name": spec.name,
            "state": state,
            "driver_pid": std::process::id(),
            "updated_unix": unix_now(),
            "attempt": attempt,
            "restarts": self.restarts.total(),
            "step": step,
            "total_steps": spec.steps,
            "loss": loss,
            "steps_per_s": rate.map(|r| r.0),
            "tokens_per_s": rate.map(|r| r.1),
            "eta_s": eta,
            "roles": roles,
            "attempts": self.attempts,
            "dashboard": self.dashboard,
        });
        let path = self.run.path.join(STATUS_FILE);
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&status)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::debug!(error = %e, "status.json not written");
        }
    }
}
