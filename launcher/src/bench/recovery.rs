//! `rtrain bench recovery`: kill -9 a worker of a running job and time training coming back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// `rtrain bench recovery`.
pub fn recovery_command(config: Option<PathBuf>, kills: u64, steps_between: u64, json: bool) -> ExitCode {
    match recovery(config, kills, steps_between, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: recovery benchmark: {e}");
            ExitCode::from(1)
        }
    }
}

/// The GPT benchmark spec, shipped with the binary so the benchmark runs from anywhere.
const BENCH_GPT: &str = include_str!("../../../configs/bench/ddp_gpt.toml");
const RECOVERY_TARGET_S: f64 = 2.0;
const STALL_TARGET: f64 = 0.05;
const WAIT: Duration = Duration::from_secs(600);

/// Stops the benchmark's launch if the benchmark itself fails.
struct Launched(Child);

impl Drop for Launched {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn recovery(config: Option<PathBuf>, kills: u64, steps_between: u64, json: bool) -> Result<(), String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cfg = match config {
        Some(path) => path,
        None => {
            let path = work.path().join("ddp_gpt.toml");
            std::fs::write(&path, BENCH_GPT).map_err(|e| e.to_string())?;
            path
        }
    };
    let loaded = crate::config::load(&cfg, &[]).map_err(|e| e.to_string())?;
    let run_path = work.path().join("runs").join(&loaded.spec.name);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let sets = [
        format!("job.run_dir={}", work.path().join("runs").display()),
        "train.steps=1000000".into(),
        "checkpoint.every=2".into(),
        format!("fault.max_restarts={kills}"),
    ];
    let mut cmd = Command::new(exe);
    cmd.arg("launch").arg(&cfg).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let launched = Launched(cmd.spawn().map_err(|e| format!("cannot start rtrain launch: {e}"))?);
    if !json {
        eprintln!(
            "recovery: {} ({} workers), kill -9 of rank 1 after every {steps_between} steps, {kills} times",
            cfg.display(),
            loaded.spec.workers
        );
    }
    let config_env = format!("RTRAIN_CONFIG={}", run_path.join("config.toml").display());
    // Per kill: kill → the new gang's first step starts (state restored, training again), and
    // kill → that step is done (what summary.json's recovery_s counts, from detection).
    let (mut resumed, mut recoveries) = (Vec::new(), Vec::new());
    let mut killed_at: Option<f64> = None;
    for k in 0..=kills {
        let (first, done, took) = wait_for(&run_path, |m| {
            let l = m.iter().find(|l| l["attempt"] == k)?;
            Some((l["step"].as_u64()?, l["time"].as_f64()?, l["step_time_s"].as_f64()?))
        })?;
        if let Some(t) = killed_at.take() {
            resumed.push(done - took - t);
            recoveries.push(done - t);
            if !json {
                eprintln!(
                    "  kill {k}: training again after {:.2} s, first step done after {:.2} s (resumed at step {})",
                    done - took - t,
                    done - t,
                    first - 1
                );
            }
        }
        if k == kills {
            break;
        }
        wait_for(&run_path, |m| {
            m.last().filter(|l| l["attempt"] == k && l["step"].as_u64() >= Some(first + steps_between)).map(|_| ())
        })?;
        let pid = find_worker(&config_env, 1).ok_or("rank 1 is not running")?;
        killed_at = Some(crate::contract::unix_now());
        // SAFETY: plain syscall on a worker of the job this benchmark started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    drop(launched);

    let metrics = read_metrics(&run_path);
    let step_times: Vec<f64> = metrics.iter().filter_map(|l| l["step_time_s"].as_f64()).collect();
    let stalls: Vec<f64> = metrics.iter().filter_map(|l| l["checkpoint_stall_s"].as_f64()).collect();
    let (step_s, stall_s) = (median(&step_times), median(&stalls));
    let (resumed_s, recovery_s) = (median(&resumed), median(&recoveries));
    if json {
        let v = serde_json::json!({
            "resumed_s": resumed, "resumed_median_s": resumed_s, "recovery_target_s": RECOVERY_TARGET_S,
            "first_step_done_s": recoveries, "first_step_done_median_s": recovery_s,
            "step_time_s": step_s, "checkpoint_stall_s": stall_s, "stall_fraction": stall_s / step_s, "stall_target": STALL_TARGET,
            "saves": stalls.len(),
        });
        println!("{v}");
    } else {
        println!("{:<46} {:>10} {:>10}", "figure (medians)", "measured", "target");
        println!(
            "{:<46} {:>9.2}s {:>9.1}s",
            "kill -9 → training again (first step starts)", resumed_s, RECOVERY_TARGET_S
        );
        println!("{:<46} {:>9.2}s {:>10}", "kill -9 → first step done", recovery_s, "");
        println!(
            "{:<46} {:>9.1}% {:>9.0}%",
            format!("async save stall / step time ({} saves)", stalls.len()),
            100.0 * stall_s / step_s,
            100.0 * STALL_TARGET
        );
        println!("  step time {:.3} s, stall {:.4} s", step_s, stall_s);
    }
    Ok(())
}

fn read_metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Polls metrics.jsonl until `found` returns something.
fn wait_for<T>(run: &Path, mut found: impl FnMut(&[serde_json::Value]) -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = found(&read_metrics(run)) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("no progress in {} within {WAIT:?}; see its logs/", run.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn find_worker(config_env: &str, rank: usize) -> Option<u32> {
    let rank_env = format!("RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let has = |want: &str| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes());
        (has(config_env) && has(&rank_env)).then_some(pid)
    })
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
