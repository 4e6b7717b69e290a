//! The Prometheus text exposition of a run: its progress from `status.json`, each process's state
//! and heartbeat, and the latest value of every metric in `metrics.jsonl` (as
//! `rtrain_metric{role, name}`, so a script's own metric names need no translating).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

/// Label values escaped as the text format asks: backslash, quote and newline.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One metric family: its help, its type and its samples (`labels`, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {}", number(*value));
    }
}

/// Prometheus spells the non-finite numbers its own way.
fn number(v: f64) -> String {
    match v {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => v.to_string(),
    }
}

pub fn exposition(status: &Value, latest: &BTreeMap<(String, String), (u64, f64)>) -> String {
    let job = label(status.get("name").and_then(Value::as_str).unwrap_or(""));
    let job_labels = format!("job=\"{job}\"");
    let mut out = String::new();
    let state = status.get("state").and_then(Value::as_str).unwrap_or("unknown");
    family(
        &mut out,
        "rtrain_info",
        "gauge",
        "The run and its state (the value is always 1).",
        &[(format!("{job_labels},state=\"{}\"", label(state)), 1.0)],
    );
    let scalars = [
        ("rtrain_step", "gauge", "Optimizer steps completed.", "step"),
        ("rtrain_total_steps", "gauge", "Optimizer steps the run makes.", "total_steps"),
        ("rtrain_loss", "gauge", "Loss of the latest step.", "loss"),
        ("rtrain_steps_per_second", "gauge", "Steps per second over the current attempt.", "steps_per_s"),
        ("rtrain_tokens_per_second", "gauge", "Tokens per second over the current attempt.", "tokens_per_s"),
        ("rtrain_eta_seconds", "gauge", "Estimated seconds to the last step.", "eta_s"),
        ("rtrain_attempt", "gauge", "Number of the current attempt (from 0).", "attempt"),
        ("rtrain_restarts_total", "counter", "Restarts so far.", "restarts"),
    ];
    for (name, kind, help, key) in scalars {
        if let Some(v) = status.get(key).and_then(Value::as_f64) {
            family(&mut out, name, kind, help, &[(job_labels.clone(), v)]);
        }
    }
    let (mut up, mut steps, mut ages) = (Vec::new(), Vec::new(), Vec::new());
    for (role, r) in status.get("roles").and_then(Value::as_object).into_iter().flatten() {
        for rank in r.get("ranks").and_then(Value::as_array).into_iter().flatten() {
            let labels = format!(
                "{job_labels},role=\"{}\",rank=\"{}\"",
                label(role),
                rank.get("rank").and_then(Value::as_u64).unwrap_or(0)
            );
            let running = rank.get("state").and_then(Value::as_str) == Some("running");
            up.push((labels.clone(), if running { 1.0 } else { 0.0 }));
            if let Some(step) = rank.get("step").and_then(Value::as_f64) {
                steps.push((labels.clone(), step));
            }
            if let Some(age) = rank.get("heartbeat_age_s").and_then(Value::as_f64) {
                ages.push((labels, age));
            }
        }
    }
    family(&mut out, "rtrain_process_running", "gauge", "1 while the process runs.", &up);
    family(&mut out, "rtrain_process_step", "gauge", "The step of the process's latest heartbeat.", &steps);
    family(&mut out, "rtrain_heartbeat_age_seconds", "gauge", "Seconds since the process's last heartbeat.", &ages);
    let metrics: Vec<(String, f64)> = latest
        .iter()
        .map(|((role, name), (_, v))| (format!("{job_labels},role=\"{}\",name=\"{}\"", label(role), label(name)), *v))
        .collect();
    family(&mut out, "rtrain_metric", "gauge", "Latest value of each metric in metrics.jsonl.", &metrics);
    let steps: Vec<(String, f64)> = latest
        .iter()
        .map(|((role, name), (step, _))| {
            (format!("{job_labels},role=\"{}\",name=\"{}\"", label(role), label(name)), *step as f64)
        })
        .collect();
    family(&mut out, "rtrain_metric_step", "gauge", "The step the latest value of each metric came with.", &steps);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn exposition_has_progress_processes_and_metrics() {
        let status = json!({
            "name": "demo\"x", "state": "running", "step": 12, "total_steps": 100, "loss": 1.5, "restarts": 1,
            "roles": {"trainer": {"size": 2, "ranks": [
                {"rank": 0, "state": "running", "step": 12, "heartbeat_age_s": 0.5},
                {"rank": 1, "state": "not running", "step": null, "heartbeat_age_s": null}]}},
        });
        let mut latest = BTreeMap::new();
        latest.insert(("trainer".to_string(), "reward_mean".to_string()), (12, 0.25));
        latest.insert(("trainer".to_string(), "grad_norm".to_string()), (12, f64::NAN));
        let text = exposition(&status, &latest);
        assert!(text.contains("rtrain_info{job=\"demo\\\"x\",state=\"running\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE rtrain_restarts_total counter\n"), "{text}");
        assert!(text.contains("rtrain_step{job=\"demo\\\"x\"} 12\n"), "{text}");
        assert!(text.contains("rtrain_process_running{job=\"demo\\\"x\",role=\"trainer\",rank=\"1\"} 0\n"), "{text}");
        assert!(
            text.contains("rtrain_metric{job=\"demo\\\"x\",role=\"trainer\",name=\"reward_mean\"} 0.25\n"),
            "{text}"
        );
        assert!(text.contains("name=\"grad_norm\"} NaN\n"), "{text}");
        assert!(!text.contains("rtrain_eta_seconds"), "absent values are left out: {text}");
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap_or_default();
            assert!(value.parse::<f64>().is_ok() || value == "NaN", "{line}");
        }
    }
}
