//! Supervision with real processes: signals to the launcher, failing and killed workers,
//! and no orphans left behind in any case.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

fn long_job(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    write_config(dir, "job.toml", &tiny_gpt(name, dir, 2, 1, 1_000_000))
}

fn config_env(run: &std::path::Path) -> String {
    format!("RTRAIN_CONFIG={}", run.join("config.toml").display())
}

#[test]
fn sigterm_and_sigint_stop_every_worker() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = long_job(dir.path(), "stopme");
        let run_path = dir.path().join("stopme");
        let guard = spawn(&["launch", cfg.to_str().unwrap()]);
        let pid = guard.0.as_ref().unwrap().id();
        assert!(wait_until(LIMIT, || metrics(&run_path).len() >= 2), "training never started");
        let workers = processes_with_env(&config_env(&run_path));
        assert_eq!(workers.len(), 2, "two workers running: {workers:?}");

        signal(pid, sig);
        let out = wait_output(guard, LIMIT);
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert!(stderr(&out).contains("all workers stopped"), "{}", stderr(&out));
        assert!(processes_with_env(&config_env(&run_path)).is_empty(), "orphaned workers");
        assert_eq!(summary(&run_path)["status"], "interrupted");
    }
}

#[test]
fn killed_worker_stops_the_gang_with_a_root_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = long_job(dir.path(), "killed");
    let run_path = dir.path().join("killed");
    let guard = spawn(&["launch", cfg.to_str().unwrap(), "--set", "fault.max_restarts=0"]);
    assert!(wait_until(LIMIT, || metrics(&run_path).len() >= 2), "training never started");
    let workers = processes_with_env(&config_env(&run_path));
    assert_eq!(workers.len(), 2);
    // Find rank 1 through its environment and kill it outright.
    let rank1 = workers
        .iter()
        .copied()
        .find(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            env.split(|b| *b == 0).any(|kv| kv == b"RANK=1")
        })
        .expect("rank 1");
    signal(rank1, libc::SIGKILL);

    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("root cause: trainer:1 was killed by signal 9 (SIGKILL)"), "{err}");
    assert!(err.contains("trainer-1.log"), "{err}");
    assert!(err.contains("no restart left: 0 of fault.max_restarts = 0 used"), "{err}");
    assert!(processes_with_env(&config_env(&run_path)).is_empty(), "orphaned workers");
    let s = summary(&run_path);
    assert_eq!(s["status"], "failed");
    assert_eq!(s["attempts"][0]["cause"], "trainer:1 was killed by signal 9 (SIGKILL)");
}

#[test]
fn failing_entrypoint_is_summarised_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("worker.sh");
    std::fs::write(
        &script,
        "if [ \"$RANK\" = 1 ]; then echo \"rank 1 loading shard\"; echo \"CUDA out of memory (simulated)\" >&2; exit 7; fi\n\
         sleep 300 & wait\n",
    )
    .unwrap();
    let text = format!(
        "[job]\nname = \"fails\"\nrun_dir = \"{}\"\nentrypoint = [\"bash\", \"{}\"]\n[train]\nworkers = 2\n",
        dir.path().display(),
        script.display()
    );
    let cfg = write_config(dir.path(), "job.toml", &text);
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("root cause: trainer:1 exited with exit code 7"), "{err}");
    assert!(err.contains("CUDA out of memory (simulated)") && err.contains("rank 1 loading shard"), "{err}");
    assert!(err.contains("stopped by rtrain: trainer:0"), "{err}");
    // rank 0's `sleep` child was in its process group and went with it.
    assert!(processes_with_env(&config_env(&dir.path().join("fails"))).is_empty(), "orphaned workers");
}

#[test]
fn a_failing_training_loop_reports_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.toml", &tiny_gpt("nodata", dir.path(), 2, 1, 5));
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", "data.source=/nonexistent/corpus.txt"], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exited with exit code 1"), "{err}");
    assert!(err.contains("error: data.source") && err.contains("/nonexistent/corpus.txt"), "{err}");
}
