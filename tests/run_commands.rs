//! `rtrain runs`, `status`, `logs` and `stop` from a second process on a live run (a Python
//! training script with the helper package), and on the run after it ended.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_live_run_is_seen_followed_and_stopped_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[job]
name = "watched"
run_dir = "{run_dir}"
entrypoint = ["python3", "{script}"]
env = {{ PYTHONPATH = "{python}" }}

[train]
workers = 2
steps = 2000

[user]
every = 50
pause_s = 0.02
"#,
        run_dir = dir.path().display(),
        script = repo("tests/scripts/report_steps.py").display(),
        python = repo("python").display(),
    );
    let cfg = write_config(dir.path(), "watched.toml", &text);
    let run_path = dir.path().join("watched");
    let run_arg = run_path.to_str().unwrap();
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    let steps = || metrics(&run_path).iter().filter(|m| m.get("loss").is_some()).count();
    assert!(wait_until(LIMIT, || steps() >= 20 && run_path.join("status.json").exists()), "no steps");
    // status.json is rewritten every second: wait for one that has seen steps.
    assert!(wait_until(LIMIT, || stdout(&run(&["status", run_arg], LIMIT)).contains(", step ")));

    let status = stdout(&run(&["status", run_arg], LIMIT));
    assert!(status.starts_with("watched: running (rtrain pid "), "{status}");
    assert!(status.contains("/2000") && status.contains("ETA"), "{status}");
    for rank in [0, 1] {
        let pid = pid_of(&run_path, "trainer", rank).expect("live rank");
        assert!(status.contains(&format!("rank {rank:<4} pid {pid:<8} running")), "{status}");
    }
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(&["status", run_arg, "--json"], LIMIT))).unwrap();
    assert_eq!(json["state"], "running");
    assert!(json["roles"]["trainer"]["ranks"][1]["heartbeat_age_s"].as_f64().unwrap() < 10.0, "{json}");

    let runs = stdout(&run(&["runs", dir.path().to_str().unwrap()], LIMIT));
    assert!(runs.contains("watched") && runs.contains("running (rtrain pid"), "{runs}");
    let logs = stdout(&run(&["logs", run_arg, "--rank", "1"], LIMIT));
    assert!(logs.contains("rank 1 of 2 starting at step 0"), "{logs}");

    // Following the log while the run is stopped from here: both end.
    let follower = spawn(&["logs", run_arg, "--follow"]);
    let out = run(&["stop", run_arg], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("stopped (interrupted)"), "{}", stdout(&out));
    let launch = wait_output(guard, LIMIT);
    assert_eq!(launch.status.code(), Some(128 + libc::SIGTERM), "{}", stderr(&launch));
    let followed = wait_output(follower, LIMIT);
    assert!(followed.status.success() && stdout(&followed).contains("rank 0 of 2 starting"), "{}", stderr(&followed));

    // The script caught the SIGTERM and saved the step it stopped at.
    let log = std::fs::read_to_string(run_path.join("logs/attempt-0/trainer-0.log")).unwrap();
    let at: u64 = log
        .split("rank 0 stopped on request at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("rank 0 did not stop on request: {log}"));
    assert!(run_path.join(format!("checkpoints/step-{at:06}/MANIFEST.json")).exists(), "step {at} saved");

    let after = stdout(&run(&["status", run_arg], LIMIT));
    assert!(after.starts_with("watched: interrupted at step "), "{after}");
    assert_eq!(summary(&run_path)["status"], "interrupted");
    assert!(stdout(&run(&["stop", run_arg], LIMIT)).contains("is not running"));

    let out = run(&["status", dir.path().to_str().unwrap()], LIMIT);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not a run directory"), "{}", stderr(&out));
    let out = run(&["logs", run_arg, "--role", "nosuch"], LIMIT);
    assert!(stderr(&out).contains("--role"), "{}", stderr(&out));
}

/// `rtrain stop` on the built-in trainer: every rank stops at the same step, which is saved as a
/// checkpoint (none was due), and the next launch resumes from it.
#[test]
fn stop_saves_a_checkpoint_of_the_step_it_stops_at_and_launch_resumes_there() {
    let dir = tempfile::tempdir().unwrap();
    // No checkpoint is due before step 1 000 000: the one found afterwards comes from the stop.
    let text = tiny_gpt("stopped", dir.path(), 2, 1, 1_000_000) + "\n[checkpoint]\nevery = 1000000\n";
    let cfg = write_config(dir.path(), "stopped.toml", &text);
    let run_path = dir.path().join("stopped");
    let run_arg = run_path.to_str().unwrap();
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || metrics(&run_path).len() >= 20), "no steps");
    let out = run(&["stop", run_arg], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let launch = wait_output(guard, LIMIT);
    assert_eq!(launch.status.code(), Some(128 + libc::SIGTERM), "{}", stderr(&launch));
    assert!(stderr(&launch).contains("the workers save a checkpoint at the end of their step"), "{}", stderr(&launch));

    let last = metrics(&run_path).last().unwrap()["step"].as_u64().unwrap();
    let saved: Vec<String> = std::fs::read_dir(run_path.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(saved, [format!("step-{last:06}")], "the stop's step is saved");
    for rank in [0, 1] {
        let log = std::fs::read_to_string(run_path.join(format!("logs/attempt-0/trainer-{rank}.log"))).unwrap();
        assert!(log.contains(&format!("stopped on request after saving a checkpoint step={last}")), "{log}");
    }
    let verified = run(&["ckpt", "verify", run_arg], LIMIT);
    assert!(verified.status.success(), "{}", stderr(&verified));

    let target = format!("train.steps={}", last + 3);
    let again = run(&["launch", cfg.to_str().unwrap(), "--set", &target], LIMIT);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains(&format!("(step {last})")), "{}", stderr(&again));
    let steps: Vec<u64> = metrics(&run_path).iter().filter_map(|m| m["step"].as_u64()).collect();
    assert_eq!(&steps[steps.len() - 3..], [last + 1, last + 2, last + 3]);
}
