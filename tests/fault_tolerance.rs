//! Checkpoints, exact resume and restarts, with faults injected for real: SIGTERM to the
//! launcher, kill -9 and SIGSTOP to workers, a kill during a checkpoint write, damaged
//! checkpoint files, lost CPU capacity. "Equal parameters" means byte-identical safetensors
//! files, compared through the SHA-256 sums in the final checkpoints' manifests.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const LIMIT: Duration = Duration::from_secs(240);

/// A small GPT job whose steps take long enough (tens of ms) for faults to land mid-run.
fn job(name: &str, dir: &Path, workers: &str, steps: u32, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[job]
name = "{name}"
run_dir = "{run_dir}"
seed = 7

[train]
workers = {workers}
steps = {steps}
micro_batch = 4
grad_accum = 1
lr = 3e-3
warmup_steps = 2
collective_timeout_s = 30

[model]
n_layer = 2
n_head = 2
n_embd = 64
n_ctx = 32

[data]
synthetic_bytes = 50000

[checkpoint]
every = 2
keep_last = 50

[rendezvous]
heartbeat_s = 0.2

[fault]
max_restarts = 5
backoff_s = 0.05
{extra}
"#,
        run_dir = dir.display()
    );
    write_config(dir, &format!("{name}.toml"), &text)
}

fn launch_ok(cfg: &Path, sets: &[&str]) -> String {
    let mut args = vec!["launch", cfg.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = run(&args, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    err
}

/// SHA-256 of a file of the checkpoint of `step`, from its manifest.
fn file_sha(run: &Path, step: u64, file: &str) -> String {
    let path = run.join(format!("checkpoints/step-{step:06}/MANIFEST.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entry = manifest["files"].as_array().unwrap().iter().find(|f| f["name"] == file).expect("file in manifest");
    entry["sha256"].as_str().unwrap().to_string()
}

fn assert_same_final_state(a: &Path, b: &Path, step: u64) {
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            file_sha(a, step, file),
            file_sha(b, step, file),
            "{file} of step {step} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn last_step(run: &Path) -> u64 {
    metrics(run).last().and_then(|m| m["step"].as_u64()).unwrap_or(0)
}

fn last_attempt(run: &Path) -> u64 {
    metrics(run).last().and_then(|m| m["attempt"].as_u64()).unwrap_or(0)
}

fn config_env(run: &Path) -> String {
    format!("RTRAIN_CONFIG={}", run.join("config.toml").display())
}

/// The live worker of `rank` in the run at `run`.
fn worker_pid(run: &Path, rank: usize) -> Option<u32> {
    processes_with_env(&config_env(run)).into_iter().find(|pid| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        env.split(|b| *b == 0).any(|kv| kv == format!("RANK={rank}").as_bytes())
    })
}

/// A seed printed by the test, so a failing random schedule can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("RTRAIN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!("fault schedule seed: {seed} (RTRAIN_TEST_SEED={seed} replays it)");
    seed
}

fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn interrupted_and_resumed_run_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let reference = job("reference", dir.path(), "2", steps, "");
    launch_ok(&reference, &[]);

    let cfg = job("resumed", dir.path(), "2", steps, "");
    let run_path = dir.path().join("resumed");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || last_step(&run_path) >= 9), "training never reached step 9");
    signal(guard.0.as_ref().unwrap().id(), libc::SIGTERM);
    let out = wait_output(guard, LIMIT);
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let stopped_at = last_step(&run_path);
    assert!(stopped_at < steps as u64, "the run was interrupted before its end");

    let err = launch_ok(&cfg, &[]);
    assert!(err.contains("resuming from") && err.contains("step-0000"), "{err}");
    assert_same_final_state(&dir.path().join("reference"), &run_path, steps as u64);
    let s = summary(&run_path);
    assert_eq!(s["status"], "finished");
    assert_eq!(s["final_step"], steps);
    // From the checkpoint the stop saved of the step it stopped at.
    let resumed = s["attempts"][0]["resumed_from_step"].as_u64().expect("resumed");
    assert_eq!(resumed, stopped_at, "{s}");
    // Async saves report their stall; the last line is the final step, which always saves.
    let m = metrics(&run_path);
    assert!(m.last().unwrap()["checkpoint_stall_s"].as_f64().is_some_and(|t| t >= 0.0));

    // The user's view of the checkpoints.
    let list = run(&["ckpt", "list", run_path.to_str().unwrap()], LIMIT);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success() && text.contains("(latest)") && text.contains(&format!("{steps:>8}  ok")), "{text}");
    let verify = run(&["ckpt", "verify", run_path.to_str().unwrap()], LIMIT);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let inspect = run(&["ckpt", "inspect", run_path.to_str().unwrap()], LIMIT);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains(&format!("step {steps} | workers 2")) && text.contains("transformer.wte.weight"), "{text}");
}

#[test]
fn kill_9_random_ranks_repeatedly_and_still_match() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let reference = job("reference", dir.path(), "2", steps, "");
    launch_ok(&reference, &[]);

    let mut rng = seed();
    let cfg = job("killed", dir.path(), "2", steps, "");
    let run_path = dir.path().join("killed");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    let kills = 3;
    for k in 0..kills {
        // Wait for attempt k to train a few (random) steps, then kill a random rank.
        let after = 2 + next_random(&mut rng) % 5;
        let start = Instant::now();
        let mut first_seen = None;
        let reached = wait_until(LIMIT, || {
            let m = metrics(&run_path);
            let Some(last) = m.last() else { return false };
            if last["attempt"].as_u64() != Some(k) {
                return false;
            }
            let first = *first_seen.get_or_insert(last["step"].as_u64().unwrap());
            last["step"].as_u64().unwrap() >= first + after
        });
        assert!(reached, "attempt {k} did not train (waited {:?})", start.elapsed());
        let rank = (next_random(&mut rng) % 2) as usize;
        let pid = worker_pid(&run_path, rank).expect("worker alive");
        eprintln!("kill -9 rank {rank} at step {}", last_step(&run_path));
        signal(pid, libc::SIGKILL);
        assert!(wait_until(LIMIT, || last_attempt(&run_path) > k), "no restart after kill {k}");
    }
    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("was killed by signal 9 (SIGKILL); restarting"), "{err}");
    assert_same_final_state(&dir.path().join("reference"), &run_path, steps as u64);
    let s = summary(&run_path);
    assert_eq!(s["restarts"], kills);
    let attempts = s["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), kills as usize + 1, "{s}");
    for a in &attempts[..kills as usize] {
        assert!(a["cause"].as_str().unwrap().ends_with("was killed by signal 9 (SIGKILL)"), "{s}");
        assert_eq!(a["class"], "infrastructure");
        assert!(a["recovery_s"].as_f64().is_some_and(|r| r > 0.0), "{s}");
    }
    assert!(attempts[kills as usize]["cause"].is_null());
    assert!(processes_with_env(&config_env(&run_path)).is_empty(), "orphaned workers");
}

#[test]
fn a_stopped_rank_is_detected_as_hung_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job("hang", dir.path(), "2", 60, "heartbeat_timeout_s = 2.0");
    let run_path = dir.path().join("hang");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || last_step(&run_path) >= 5), "training never started");
    let pid = worker_pid(&run_path, 1).expect("rank 1");
    signal(pid, libc::SIGSTOP);
    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let s = summary(&run_path);
    let cause = s["attempts"][0]["cause"].as_str().unwrap();
    assert!(cause.starts_with("trainer:1 stopped responding: no heartbeat for"), "{s}");
    assert!(cause.contains("fault.heartbeat_timeout_s = 2"), "{cause}");
    assert_eq!(s["final_step"], 60);
    assert!(processes_with_env(&config_env(&run_path)).is_empty(), "the stopped worker was not left behind");
}

#[test]
fn killed_during_a_checkpoint_write_resumes_from_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    // A bigger model, saved every step, so writes are long enough to be caught in the act.
    let bigger = "[model]\nn_layer = 4\nn_head = 4\nn_embd = 128\nn_ctx = 32";
    let write = |name: &str| {
        let cfg = job(name, dir.path(), "2", 14, "");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("[model]\nn_layer = 2\nn_head = 2\nn_embd = 64\nn_ctx = 32", bigger);
        let text = text.replace("every = 2", "every = 1");
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let reference = write("reference");
    launch_ok(&reference, &[]);

    let cfg = write("torn");
    let run_path = dir.path().join("torn");
    let checkpoints = run_path.join("checkpoints");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || last_step(&run_path) >= 3), "training never started");
    // Poll for a checkpoint being written (a `.tmp-step-*` directory), then kill its writer.
    let deadline = Instant::now() + LIMIT;
    let caught = loop {
        let writing = std::fs::read_dir(&checkpoints)
            .map(|d| {
                d.flatten().find(|e| e.file_name().to_string_lossy().starts_with(".tmp-step-")).map(|e| e.file_name())
            })
            .ok()
            .flatten();
        if let Some(name) = writing {
            let pid = worker_pid(&run_path, 0).expect("rank 0");
            signal(pid, libc::SIGKILL);
            break Some(name.to_string_lossy().into_owned());
        }
        if Instant::now() > deadline || last_attempt(&run_path) > 0 || last_step(&run_path) >= 13 {
            break None;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let torn = caught.expect("no checkpoint write was caught in progress");
    eprintln!("killed rank 0 while writing {torn}");
    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("trainer:0 was killed by signal 9"), "{err}");
    let resumed = summary(&run_path)["attempts"][1]["resumed_from_step"].as_u64().expect("resumed");
    let torn_step: u64 = torn.trim_start_matches(".tmp-step-").split('-').next().unwrap().parse().unwrap();
    assert!(resumed < torn_step, "resumed from {resumed}, the torn write was step {torn_step}");
    assert_same_final_state(&dir.path().join("reference"), &run_path, 14);
    assert!(
        !std::fs::read_dir(&checkpoints)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
    );
}

#[test]
fn damaged_checkpoints_are_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 50;
    let reference = job("reference", dir.path(), "2", steps, "");
    launch_ok(&reference, &[]);

    let cfg = job("damaged", dir.path(), "2", steps, "");
    let run_path = dir.path().join("damaged");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || last_step(&run_path) >= 9), "training never reached step 9");
    signal(guard.0.as_ref().unwrap().id(), libc::SIGTERM);
    let _ = wait_output(guard, LIMIT);

    let saved: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(run_path.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-"))
            .collect();
        v.sort();
        v
    };
    assert!(saved.len() >= 3, "{saved:?}");
    let (newest, second) = (&saved[saved.len() - 1], &saved[saved.len() - 2]);
    // Flip one byte of the newest model file; truncate the second newest optimizer file.
    let model = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let optimizer = second.join("optimizer.safetensors");
    let len = std::fs::metadata(&optimizer).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&optimizer).unwrap().set_len(len / 2).unwrap();

    let verify = run(&["ckpt", "verify", run_path.to_str().unwrap()], LIMIT);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "{text}");
    assert!(text.contains("corrupted") && text.contains("truncated"), "{text}");

    let err = launch_ok(&cfg, &[]);
    assert!(
        err.contains(&format!("warning: skipping checkpoint {}", newest.display())) && err.contains("corrupted"),
        "{err}"
    );
    assert!(
        err.contains(&format!("warning: skipping checkpoint {}", second.display())) && err.contains("truncated"),
        "{err}"
    );
    let third = &saved[saved.len() - 3];
    assert!(err.contains(&format!("resuming from {}", third.display())), "{err}");
    assert_same_final_state(&dir.path().join("reference"), &run_path, steps as u64);
}

#[test]
fn resume_with_fewer_workers_keeps_the_global_batch_and_refuses_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 30;
    let reference = job("reference", dir.path(), "2", steps, "");
    launch_ok(&reference, &[]);

    let cfg = job("shrunk", dir.path(), "2", steps, "");
    let run_path = dir.path().join("shrunk");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || last_step(&run_path) >= 5), "training never started");
    signal(guard.0.as_ref().unwrap().id(), libc::SIGTERM);
    let _ = wait_output(guard, LIMIT);

    // Another architecture: refused, naming the keys, before any worker starts.
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", "model.n_layer=3", "--set", "model.n_embd=96"], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("model.n_layer is 3 in the config but 2 in the checkpoint"), "{err}");
    assert!(err.contains("model.n_embd is 96 in the config but 64 in the checkpoint"), "{err}");

    // One worker: global batch 8 kept through gradient accumulation 2.
    let err = launch_ok(&cfg, &["train.workers=1"]);
    assert!(err.contains("keeping its global batch of 8"), "{err}");
    let s = summary(&run_path);
    assert_eq!(s["global_batch"], 8);
    assert_eq!(s["workers"], 1);
    // The same samples in another reduction order: the loss curve matches to float tolerance.
    let want = metrics(&dir.path().join("reference"));
    let got = metrics(&run_path);
    for m in got.iter().rev().take(6) {
        let step = m["step"].as_u64().unwrap() as usize;
        let (a, b) = (m["loss"].as_f64().unwrap(), want[step - 1]["loss"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "step {step}: {a} vs {b}");
    }
}

#[test]
fn an_elastic_gang_continues_smaller_after_losing_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 50;
    let cfg = job("elastic", dir.path(), "{ min = 1, max = 2 }", steps, "");
    let run_path = dir.path().join("elastic");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || last_step(&run_path) >= 4), "training never started");
    assert_eq!(processes_with_env(&config_env(&run_path)).len(), 2, "the gang starts at its max");
    // The launcher loses a CPU (its affinity shrinks to one core), then a worker dies.
    let launcher = guard.0.as_ref().unwrap().id();
    // Every thread of the launcher: the scheduler may ask from any of them.
    for task in std::fs::read_dir(format!("/proc/{launcher}/task")).unwrap().flatten() {
        let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only read/write it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
        }
    }
    signal(worker_pid(&run_path, 1).expect("rank 1"), libc::SIGKILL);
    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("continuing with 1 workers (was 2); global batch 8 kept"), "{err}");
    let s = summary(&run_path);
    assert_eq!(s["attempts"][0]["workers"], 2);
    assert_eq!(s["attempts"][1]["workers"], 1);
    assert_eq!(s["global_batch"], 8);
    assert_eq!(s["final_step"], steps);
    // The step counter and the LR schedule carry on: lr is a function of the step alone.
    let m = metrics(&run_path);
    let resumed = s["attempts"][1]["resumed_from_step"].as_u64().unwrap() as usize;
    let after = m.iter().find(|l| l["attempt"] == 1).unwrap();
    assert_eq!(after["step"].as_u64().unwrap() as usize, resumed + 1);
}

#[test]
fn training_code_failures_have_their_own_restart_budget() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("worker.sh");
    std::fs::write(
        &script,
        "echo \"attempt $TORCHELASTIC_RESTART_COUNT\"; if [ \"$RANK\" = 1 ]; then exit 3; fi\nsleep 300 & wait\n",
    )
    .unwrap();
    let text = format!(
        "[job]\nname = \"flaky\"\nrun_dir = \"{}\"\nentrypoint = [\"bash\", \"{}\"]\n[train]\nworkers = 2\n[fault]\nmax_user_restarts = 1\nbackoff_s = 0.05\n",
        dir.path().display(),
        script.display()
    );
    let cfg = write_config(dir.path(), "job.toml", &text);
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("job flaky failed in attempt 1"), "{err}");
    assert!(err.contains("attempt 0: trainer:1 exited with exit code 3"), "{err}");
    assert!(err.contains("no restart left: 1 of fault.max_user_restarts = 1 used (training code failure)"), "{err}");
    let s = summary(&dir.path().join("flaky"));
    assert_eq!(s["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(s["attempts"][0]["class"], "user");
    let log = std::fs::read_to_string(dir.path().join("flaky/logs/attempt-1/trainer-0.log")).unwrap();
    assert!(log.contains("attempt 1"), "workers see the restart count: {log}");
}

#[test]
fn a_failing_checkpoint_write_is_reported_and_damages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job("full", dir.path(), "2", 6, "");
    let run_path = dir.path().join("full");
    launch_ok(&cfg, &[]);
    let before: Vec<String> = [2u64, 4, 6].iter().map(|s| file_sha(&run_path, *s, "model.safetensors")).collect();

    // Continue to step 10 with files limited to 700 KiB: the model file (~470 KiB) fits, the
    // optimizer file (~940 KiB) does not, so every save fails half-way, like a full disk.
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            "ulimit -f 700 && exec \"$0\" \"$@\"",
            RTRAIN,
            "launch",
            cfg.to_str().unwrap(),
            "--set",
            "train.steps=10",
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("final checkpoint") && err.contains("optimizer.safetensors") && err.contains("File too large"),
        "{err}"
    );
    let log = std::fs::read_to_string(run_path.join("logs/attempt-1/trainer-0.log")).unwrap();
    assert!(log.contains("checkpoint not saved; the previous checkpoints are intact, training goes on"), "{log}");
    // The lost periodic save reaches the terminal too, not only the worker's log.
    assert!(err.contains("warning: a checkpoint was not saved") && err.contains("training goes on"), "{err}");
    // The file-size limit also keeps the shared-memory segment from being reserved: backend
    // "auto" says so and reduces over TCP instead.
    assert!(log.contains("shared memory is unavailable; using the tcp backend"), "{log}");
    assert_eq!(last_step(&run_path), 10, "training went on after the failed save of step 8");

    let verify = run(&["ckpt", "verify", run_path.to_str().unwrap()], LIMIT);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{text}");
    let after: Vec<String> = [2u64, 4, 6].iter().map(|s| file_sha(&run_path, *s, "model.safetensors")).collect();
    assert_eq!(before, after);
    let names: Vec<String> = std::fs::read_dir(run_path.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("000008") || n.contains("000010") || n.starts_with(".tmp")), "{names:?}");
}
