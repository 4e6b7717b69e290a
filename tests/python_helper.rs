//! A training script of the user's (plain Python with the `rtrain` helper package of `python/`,
//! no torch) as a first-class worker: its reports drive progress, metrics and summary, its output
//! reaches the terminal with a `role:rank` prefix, its checkpoints follow the run's rules, and a
//! SIGSTOPped rank is found hung and the gang resumes from the script's own checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn script_job(dir: &Path, name: &str, steps: u32, pause_s: f64) -> PathBuf {
    let text = format!(
        r#"
[job]
name = "{name}"
run_dir = "{run_dir}"
entrypoint = ["python3", "{script}"]
env = {{ PYTHONPATH = "{python}", EXAMPLE_NOTE = "set by job.env" }}

[train]
workers = 2
steps = {steps}

[checkpoint]
keep_last = 2

[fault]
heartbeat_timeout_s = 3
max_restarts = 2

[user]
every = 5
pause_s = {pause_s}
"#,
        run_dir = dir.display(),
        script = repo("tests/scripts/report_steps.py").display(),
        python = repo("python").display(),
    );
    write_config(dir, &format!("{name}.toml"), &text)
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_script_reports_steps_shows_its_output_and_keeps_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = script_job(dir.path(), "script", 30, 0.0);
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // Rank 0's output, live and prefixed; rank 1's only in its log.
    assert!(err.contains("trainer:0| rank 0 of 2 starting at step 0"), "{err}");
    assert!(err.contains("trainer:0| rank 0 done, total 465"), "{err}");
    assert!(!err.contains("trainer:1|"), "{err}");
    assert!(err.contains("script finished: 30 steps, loss 0.0333"), "{err}");
    let run_path = dir.path().join("script");
    let log = std::fs::read_to_string(run_path.join("logs/attempt-0/trainer-1.log")).unwrap();
    assert!(log.contains("rank 1 done, total 465"), "{log}");

    let s = summary(&run_path);
    assert_eq!(s["final_step"], 30, "{s}");
    let steps: Vec<serde_json::Value> = metrics(&run_path).into_iter().filter(|m| m.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 30);
    assert_eq!(steps[29]["running_total"], 465.0);
    assert_eq!(steps[29]["lr"], 0.1);
    // keep_last = 2 of the script's checkpoints, each with a manifest the helper verifies.
    assert_eq!(checkpoints(&run_path), ["step-000025", "step-000030"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_path.join("checkpoints/step-000030/MANIFEST.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["step"], 30);
    assert_eq!(manifest["files"][0]["name"], "state.json");

    // Every rank's output on request.
    let all = script_job(dir.path(), "all", 3, 0.0);
    let out = run(&["launch", all.to_str().unwrap(), "--set", "job.echo=\"all\""], LIMIT);
    let err = stderr(&out);
    assert!(out.status.success() && err.contains("trainer:1| rank 1 done"), "{err}");
}

#[test]
fn a_stopped_script_rank_is_hung_and_the_gang_resumes_from_the_scripts_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = script_job(dir.path(), "stopped", 40, 0.1);
    let run_path = dir.path().join("stopped");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    let reported = || metrics(&run_path).iter().filter(|m| m.get("loss").is_some()).count();
    assert!(wait_until(LIMIT, || reported() >= 12), "the script never reported");
    signal(pid_of(&run_path, "trainer", 1).expect("rank 1"), libc::SIGSTOP);
    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let s = summary(&run_path);
    assert_eq!(s["restarts"], 1, "{s}");
    assert_eq!(s["final_step"], 40, "{s}");
    let cause = s["attempts"][0]["cause"].as_str().unwrap_or_default().to_string();
    // Rank 1 stopped; rank 0 then waits for it, so either may be the first found silent.
    assert!(cause.contains("stopped responding: no heartbeat"), "{cause}");
    assert!(err.contains("trainer:0| rank 0 resumed from step"), "{err}");
    // The running total is the same as a run that was never stopped: no step was lost or redone.
    assert!(err.contains("trainer:0| rank 0 done, total 820"), "{err}");
}

#[test]
fn job_env_reaches_the_workers_and_cannot_replace_rtrains_variables() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = script_job(dir.path(), "env", 1, 0.0);
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", "job.env.RANK=\"7\""], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("job.env.RANK") && err.contains("set by rtrain"), "{err}");
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", "job.env.1X=\"y\""], LIMIT);
    assert!(stderr(&out).contains("job.env.1X"), "{}", stderr(&out));
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("trainer:0| EXAMPLE_NOTE=set by job.env"), "{err}");
}
