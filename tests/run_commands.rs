//! `rtrain runs`, `status`, `logs` and `stop` from a second process on a live run (a Python
//! training script with the helper package), and on the run after it ended.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
