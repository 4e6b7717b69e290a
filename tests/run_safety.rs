//! What a run does when it cannot go on safely, with real launches: a diverged loss, a failure
//! that repeats on every restart, a run directory another launch is using, checkpoints that are
//! all damaged, a full disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) else { return Vec::new() };
    let mut steps: Vec<u64> =
        entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()).collect();
    steps.sort();
    steps
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step_without_a_checkpoint_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_gpt("diverged", dir.path(), 2, 1, 8) + "\n[checkpoint]\nevery = 1\nkeep_last = 50\n";
    let cfg = write_config(dir.path(), "job.toml", &text);
    let run_path = dir.path().join("diverged");
    // lr 1e308 throws the weights to ±inf in the first update: step 2's loss is NaN.
    let out =
        run(&["launch", cfg.to_str().unwrap(), "--set", "train.lr=1e308", "--set", "train.warmup_steps=0"], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("step 2: the loss is") && err.contains("training diverged"), "{err}");
    assert!(err.contains("not restarted: this failure is deterministic"), "{err}");
    assert!(!err.contains("restarting in"), "a diverged run is not retried: {err}");
    let s = summary(&run_path);
    assert_eq!(s["status"], "failed", "{s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert_eq!(s["final_step"], 1, "{s}");
    // Only the finite step was saved; metrics hold no non-finite loss.
    assert_eq!(checkpoint_steps(&run_path), [1]);
    assert!(metrics(&run_path).iter().all(|m| m["loss"].as_f64().is_some_and(f64::is_finite)));
}

#[test]
fn a_failure_that_repeats_without_progress_ends_the_run_before_the_budget_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.toml", &tiny_gpt("huge", dir.path(), 2, 1, 4));
    let run_path = dir.path().join("huge");
    // A micro-batch no machine can hold: the allocation aborts the worker (SIGABRT) every time.
    let out = run(
        &["launch", cfg.to_str().unwrap(), "--set", "train.micro_batch=1000000000000", "--set", "fault.backoff_s=0.05"],
        LIMIT,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not restarted: the same failure as the attempt before (signal 6 (SIGABRT))"), "{err}");
    let s = summary(&run_path);
    assert_eq!(s["restarts"], 1, "one restart to tell a flaky machine from a failure that repeats: {s}");
    assert_eq!(s["attempts"].as_array().map(Vec::len), Some(2), "{s}");
}

fn config_env(run: &Path) -> String {
    format!("RTRAIN_CONFIG={}", run.join("config.toml").display())
}

fn moved_aside(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{name}.prev-")))
        .collect()
}

#[test]
fn a_second_launch_on_a_live_run_is_refused_and_a_killed_launcher_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_gpt("busy", dir.path(), 2, 1, 1_000_000) + "\n[checkpoint]\nevery = 2\n";
    let cfg = write_config(dir.path(), "job.toml", &text);
    let cfg = cfg.to_str().unwrap();
    let run_path = dir.path().join("busy");
    let first = spawn(&["launch", cfg]);
    let pid = first.0.as_ref().unwrap().id();
    assert!(wait_until(LIMIT, || !checkpoint_steps(&run_path).is_empty()), "no checkpoint saved");

    // Refused while the first runs, naming it; --fresh moves nothing aside either.
    for extra in [None, Some("--fresh")] {
        let mut args = vec!["launch", cfg];
        args.extend(extra);
        let out = run(&args, LIMIT);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&format!("is in use by another launch (rtrain pid {pid})")), "{args:?}: {err}");
    }
    assert!(moved_aside(dir.path(), "busy").is_empty());
    // The first launch goes on, undisturbed.
    let seen = metrics(&run_path).len();
    assert!(wait_until(LIMIT, || metrics(&run_path).len() > seen), "the first launch stopped training");
    assert!(metrics(&run_path).iter().all(|m| m["attempt"] == 0), "a second launch wrote metrics");

    // kill -9 the first launcher: the kernel drops its lock with it, and its workers follow.
    signal(pid, libc::SIGKILL);
    let _ = wait_output(first, LIMIT);
    assert!(wait_until(LIMIT, || processes_with_env(&config_env(&run_path)).is_empty()), "workers outlived it");
    let out = run(&["launch", cfg, "--set", "train.steps=1"], LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("in use"), "{err}");
}

#[test]
fn a_run_whose_checkpoints_are_all_damaged_is_refused_and_fresh_keeps_it_aside() {
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_gpt("damaged", dir.path(), 1, 1, 4) + "\n[checkpoint]\nevery = 2\n";
    let cfg = write_config(dir.path(), "job.toml", &text);
    let cfg = cfg.to_str().unwrap();
    let run_path = dir.path().join("damaged");
    let out = run(&["launch", cfg], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let steps = checkpoint_steps(&run_path);
    assert_eq!(steps, [2, 4]);
    for step in &steps {
        let model = run_path.join(format!("checkpoints/step-{step:06}/model.safetensors"));
        let len = std::fs::metadata(&model).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&model).unwrap().set_len(len / 2).unwrap();
    }
    let lines = metrics(&run_path).len();

    let out = run(&["launch", cfg, "--set", "train.steps=8"], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("every checkpoint in") && err.contains("is damaged (2 of them"), "{err}");
    assert!(err.contains("pass --fresh to start over"), "{err}");
    // Nothing trained, nothing rotated away.
    assert_eq!(checkpoint_steps(&run_path), steps);
    assert_eq!(metrics(&run_path).len(), lines);

    let out = run(&["launch", cfg, "--set", "train.steps=8", "--fresh"], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&run_path)["final_step"], 8);
    let aside = moved_aside(dir.path(), "damaged");
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(checkpoint_steps(&aside[0]), steps, "the damaged run is kept aside");
}

/// A tmpfs of `size` mounted at `dir` for the life of the guard, or why it cannot be (not
/// root, no mount permission in this container).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_loses_no_line_and_says_what_was_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    // Room for the config, the logs and the metrics, not for a checkpoint (~270 KB).
    let _tmpfs = match Tmpfs::mount(&disk, "160k") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: needs a small tmpfs of its own: {why}");
            return;
        }
    };
    let text = tiny_gpt("full", &disk, 1, 1, 400) + "\n[checkpoint]\nevery = 100000\n[fault]\nmax_user_restarts = 0\n";
    let cfg = write_config(dir.path(), "job.toml", &text);
    let run_path = disk.join("full");
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // The lost final checkpoint is named, with the disk's error; the config file is not blamed.
    assert!(err.contains("final checkpoint") && err.contains("No space left on device"), "{err}");
    assert!(!err.contains("job.toml:"), "{err}");
    // Every line of metrics.jsonl is whole; no half-written summary is left behind.
    let text = std::fs::read_to_string(run_path.join("metrics.jsonl")).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a partial last line: {:?}",
        &text[text.len().saturating_sub(80)..]
    );
    for line in text.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "a partial line: {line:?}");
    }
    assert!(!run_path.join("summary.json.tmp").exists(), "summary.json.tmp left behind");
    if let Ok(s) = std::fs::read_to_string(run_path.join("summary.json")) {
        let s: serde_json::Value = serde_json::from_str(&s).expect("summary.json is whole");
        assert_eq!(s["status"], "failed", "{s}");
    } else {
        assert!(err.contains("warning: summary.json not written"), "{err}");
    }
}

/// A run stopped (or failed) before any checkpoint leaves nothing to resume: the next launch
/// starts over by itself, keeping the old files aside; a finished one is run again only with
/// --fresh, and quick --fresh launches keep each earlier run apart.
#[test]
fn a_run_without_checkpoints_starts_over_unless_it_finished() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[job]\nname = \"bare\"\nrun_dir = \"{}\"\nentrypoint = [\"sh\", \"-c\", \"sleep 60\"]\n\n[train]\nworkers = 1\n",
        dir.path().display()
    );
    let cfg = write_config(dir.path(), "job.toml", &text);
    let cfg = cfg.to_str().unwrap();
    let run_path = dir.path().join("bare");
    let first = spawn(&["launch", cfg]);
    assert!(wait_until(LIMIT, || run_path.join("status.json").exists()), "the launch never started");
    assert!(run(&["stop", run_path.to_str().unwrap()], LIMIT).status.success());
    let out = wait_output(first, LIMIT);
    assert!(stderr(&out).contains("no checkpoint was saved: the next launch starts over"), "{}", stderr(&out));

    let done = ["launch", cfg, "--set", "job.entrypoint=[\"true\"]"];
    let out = run(&done, LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("starting over (its files are kept in"), "{}", stderr(&out));
    assert_eq!(moved_aside(dir.path(), "bare").len(), 1);

    let again = run(&done, LIMIT);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("holds a finished run") && stderr(&again).contains("--fresh"),
        "{}",
        stderr(&again)
    );
    for _ in 0..2 {
        let out = run(&[&done[..], &["--fresh"]].concat(), LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(moved_aside(dir.path(), "bare").len(), 3, "every earlier run kept apart");
}
