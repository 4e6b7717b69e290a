//! `rtrain launch` end to end with the built-in GPT trainer: real worker processes, a real
//! coordinator and a real TCP collective on loopback.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn two_workers_train_and_write_metrics_summary_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.toml", &tiny_gpt("e2e", dir.path(), 2, 1, 12));
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("e2e finished: 12 steps"), "{}", stderr(&out));
    // It ends by showing what the trained model writes after the corpus's first bytes.
    assert!(stderr(&out).contains("the final model's greedy output:"), "{}", stderr(&out));

    let run_path = dir.path().join("e2e");
    let steps = metrics(&run_path);
    assert_eq!(steps.len(), 12);
    for (i, m) in steps.iter().enumerate() {
        assert_eq!(m["step"].as_u64(), Some(i as u64 + 1));
        for key in ["loss", "lr", "tokens_per_s", "time"] {
            assert!(m[key].as_f64().is_some_and(f64::is_finite), "step {i}: {key} in {m}");
        }
    }
    let times: Vec<f64> = steps.iter().map(|m| m["time"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "step times go forward: {times:?}");
    // Warm-up of 2 steps reaches the base LR, then cosine decay to lr/10.
    assert!((steps[2]["lr"].as_f64().unwrap() - 3e-3).abs() < 1e-3);
    assert!(steps[11]["lr"].as_f64().unwrap() < steps[2]["lr"].as_f64().unwrap());
    let first = steps[0]["loss"].as_f64().unwrap();
    let last = steps[11]["loss"].as_f64().unwrap();
    assert!((first - 256f64.ln()).abs() < 0.5, "initial loss near ln(256): {first}");
    assert!(last < first - 0.5, "loss falls: {first} -> {last}");

    let s = summary(&run_path);
    assert_eq!(s["status"], "finished");
    assert_eq!(s["final_step"], 12);
    assert_eq!(s["global_batch"], 8);
    assert!(s["wall_time_s"].as_f64().unwrap() > 0.0);
    for phase in ["schedule_s", "spawn_s", "rendezvous_s", "first_step_s"] {
        assert!(s["startup"][phase].as_f64().is_some_and(|v| v >= 0.0), "{phase} in {s}");
    }
    for rank in 0..2 {
        let log = run_path.join(format!("logs/attempt-0/trainer-{rank}.log"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(&format!("trainer:{rank}")), "{}: {text}", log.display());
    }
    assert!(run_path.join("config.toml").exists());

    // The run ends with a checkpoint of its final step, and a second launch of the same run
    // resumes from it: nothing is left to run. --fresh starts over and keeps the old run aside.
    assert!(run_path.join("checkpoints/step-000012/MANIFEST.json").exists());
    let again = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("already complete at step 12"), "{}", stderr(&again));
    assert_eq!(metrics(&run_path).len(), 12);
    let fresh = run(&["launch", cfg.to_str().unwrap(), "--set", "train.steps=1", "--fresh"], LIMIT);
    assert!(fresh.status.success(), "{}", stderr(&fresh));
    assert_eq!(metrics(&run_path).len(), 1);
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("e2e.prev-"))
        .count();
    assert_eq!(kept, 1, "the earlier run is kept");
}

/// Same seed and global batch: 2 workers × grad_accum 1 must follow 1 worker × grad_accum 2.
#[test]
fn two_workers_match_one_worker_with_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 8;
    let a = write_config(dir.path(), "a.toml", &tiny_gpt("dp2", dir.path(), 2, 1, steps));
    let b = write_config(dir.path(), "b.toml", &tiny_gpt("acc2", dir.path(), 1, 2, steps));
    for cfg in [&a, &b] {
        let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let dp = metrics(&dir.path().join("dp2"));
    let acc = metrics(&dir.path().join("acc2"));
    assert_eq!(dp.len(), steps as usize);
    assert_eq!(acc.len(), steps as usize);
    for (x, y) in dp.iter().zip(&acc) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() < 1e-4 * lx.abs().max(1.0), "step {}: {lx} vs {ly}", x["step"]);
        let (gx, gy) = (x["grad_norm"].as_f64().unwrap(), y["grad_norm"].as_f64().unwrap());
        assert!((gx - gy).abs() < 1e-3 * gx.abs().max(1.0), "step {}: grad norm {gx} vs {gy}", x["step"]);
    }
    // And the curves are not trivially equal: the loss moved.
    assert!(dp[0]["loss"] != dp[steps as usize - 1]["loss"]);
}
