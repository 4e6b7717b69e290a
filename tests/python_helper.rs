//! A training script of the user's (plain Python with the `rtrain` helper package of `python/`,
//! no torch) as a first-class worker: its reports drive progress, metrics and summary, its output
//! reaches the terminal with a `role:rank` prefix, its checkpoints follow the run's rules, and a
//! SIGSTOPped rank is found hung and the gang resumes from the script's own checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

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

#[test]
fn a_launch_outlives_its_terminal_and_echoes_raw_output_safely() {
    let dir = tempfile::tempdir().unwrap();
    // 200 KB with no line end, a terminal escape, then a pause before the line ends.
    let script = "import sys, time\nsys.stdout.write('x' * 200000); sys.stdout.flush()\nprint('\\x1b[2J\\rdone', flush=True)\nfor i in range(30):\n    print('line', i, flush=True)\n    time.sleep(0.05)\n";
    let text = format!(
        "[job]\nname = \"raw\"\nrun_dir = \"{}\"\nentrypoint = [\"python3\", \"-c\", {:?}]\n[train]\nworkers = 1\nsteps = 1\n",
        dir.path().display(),
        script
    );
    let cfg = write_config(dir.path(), "raw.toml", &text);
    let mut child = std::process::Command::new(RTRAIN)
        .args(["launch", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little of the launch's output, then go away as `| head` would.
    let mut stderr = child.stderr.take().unwrap();
    let mut first = [0u8; 64];
    std::io::Read::read(&mut stderr, &mut first).unwrap();
    drop(stderr);
    let status = child.wait().unwrap();
    assert!(status.success(), "the launch died with its reader: {status}");
    let run_path = dir.path().join("raw");
    assert_eq!(summary(&run_path)["status"], "finished");
    let log = std::fs::read_to_string(run_path.join("logs/attempt-0/trainer-0.log")).unwrap();
    assert!(log.contains(&"x".repeat(200000)) && log.contains("line 29"), "the log keeps the raw output");

    // With a reader that stays, lines are cut at 64 KiB and control characters are escaped.
    // (Into a file: the test's own pipe would fill up, as no one reads it while the launch runs.)
    let err_path = dir.path().join("stderr.txt");
    let status = std::process::Command::new(RTRAIN)
        .args(["launch", cfg.to_str().unwrap(), "--fresh"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .status()
        .unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("x\\u{1b}[2J\ntrainer:0| done"), "the escape is shown, not obeyed, and \\r ends a line");
    assert!(!err.contains('\u{1b}'), "no raw escape reaches the terminal");
    let longest = err.lines().map(str::len).max().unwrap();
    assert!(longest <= (64 << 10) + 64, "a line without an end is shown in pieces: {longest}");
}

#[test]
fn the_helper_orders_checkpoints_by_step_and_refuses_nan() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
import os, math, rtrain
os.environ["RTRAIN_RUN_DIR"] = {run:?}
for step in (999998, 999999, 1000000, 1000001):
    with rtrain.save_checkpoint(step) as d:
        (d / "state.txt").write_text(str(step))
names = sorted(p.name for p in (rtrain.context().run_dir / "checkpoints").iterdir())
assert rtrain.latest_checkpoint().name == "step-1000001", names
# keep_last (3 without a config) drops the oldest by step, not by name.
assert [p.name for p in rtrain._published()] == ["step-999999", "step-1000000", "step-1000001"], names
try:
    rtrain.report(1, loss=math.nan)
except FloatingPointError as e:
    print("refused:", e)
"#,
        run = dir.path().display().to_string()
    );
    let out =
        std::process::Command::new("python3").args(["-c", &script]).env("PYTHONPATH", repo("python")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{}", text, String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("refused: step 1: loss is nan: training diverged"), "{text}");
}
