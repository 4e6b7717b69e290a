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

/// `[eval]`: the held-out loss every few steps and after the last, the same whatever the gang's
/// split of the batch, recorded by checkpoints and ranking them for `keep_best`.
#[test]
fn held_out_loss_is_evaluated_and_ranks_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "\n[eval]\nevery = 5\nbatches = 2\n\n[checkpoint]\nevery = 5\nkeep_last = 1\nkeep_best = 1\n\
                 metric = \"eval_loss\"\n";
    let evals = |name: &str, workers: u32, grad_accum: u32| {
        let text = tiny_gpt(name, dir.path(), workers, grad_accum, 12) + extra;
        let cfg = write_config(dir.path(), &format!("{name}.toml"), &text);
        let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("step 10: eval_loss "), "{}", stderr(&out));
        let rows = metrics(&dir.path().join(name));
        let evals: Vec<(u64, f64)> =
            rows.iter().filter_map(|m| Some((m["step"].as_u64()?, m.get("eval_loss")?.as_f64()?))).collect();
        (evals, rows)
    };
    let (two, rows) = evals("eval2", 2, 1);
    assert_eq!(two.iter().map(|e| e.0).collect::<Vec<_>>(), [5, 10, 12], "every 5 steps and the last: {rows:?}");
    assert!(two[2].1 < two[0].1, "the held-out loss falls: {two:?}");
    assert!((two[0].1 - 256f64.ln()).abs() < 1.5, "a byte-level loss: {two:?}");
    // One worker accumulating two micro-batches scores the same held-out windows.
    let (one, _) = evals("eval1", 1, 2);
    for ((s2, l2), (s1, l1)) in two.iter().zip(&one) {
        assert_eq!(s2, s1);
        assert!((l2 - l1).abs() < 1e-4 * l1.abs().max(1.0), "step {s2}: {l2} vs {l1}");
    }

    // Checkpoints record the held-out loss of their own step; the best one is kept besides the
    // newest.
    let ckpts = dir.path().join("eval2/checkpoints");
    let mut kept: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    let best = two.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    let mut expected = vec![format!("step-{best:06}"), "step-000012".to_string()];
    expected.dedup();
    assert_eq!(kept, expected, "{two:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpts.join("step-000012/trainer_state.json")).unwrap()).unwrap();
    assert!((state["metric"].as_f64().unwrap() - two[2].1).abs() < 1e-9, "{state}");

    // A held-out part too short for one window is refused, naming the key that made it.
    let short = tiny_gpt("short", dir.path(), 1, 1, 4) + "\n[eval]\nevery = 2\n";
    let cfg = write_config(dir.path(), "short.toml", &short);
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", "data.eval_fraction=0.0001"], LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data.eval_fraction") && stderr(&out).contains("fewer than one window"),
        "{}",
        stderr(&out)
    );

    // `rtrain plot` charts the finished run, the held-out loss with its three points.
    let run_path = dir.path().join("eval2");
    let out = run(&["plot", run_path.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("trainer-eval_loss.svg (eval_loss, 3 points)"), "{}", stderr(&out));
    let svg = std::fs::read_to_string(run_path.join("plots/trainer-eval_loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("eval_loss"), "{svg}");
    assert!(run_path.join("plots/trainer-loss.svg").exists());
}

/// The dtypes of a safetensors file's tensors, read from its header.
fn safetensors_dtypes(path: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let tensors = header.as_object().unwrap().iter().filter(|(name, _)| *name != "__metadata__");
    tensors.map(|(_, t)| t["dtype"].as_str().unwrap().to_string()).collect()
}

/// `train.precision = "bf16"`: two workers train under bf16 autocast, close to the float32 curve
/// but not on it, and the checkpoint's weights and optimizer state stay float32.
#[test]
fn bf16_training_follows_the_fp32_curve_with_float32_weights() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 8;
    let fp32 = write_config(dir.path(), "fp32.toml", &tiny_gpt("fp32", dir.path(), 2, 1, steps));
    let text = tiny_gpt("bf16", dir.path(), 2, 1, steps).replace("[train]\n", "[train]\nprecision = \"bf16\"\n");
    let bf16 = write_config(dir.path(), "bf16.toml", &text);
    for cfg in [&fp32, &bf16] {
        let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (a, b) = (metrics(&dir.path().join("fp32")), metrics(&dir.path().join("bf16")));
    assert_eq!((a.len(), b.len()), (steps as usize, steps as usize));
    let mut differs = false;
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() < 0.02 * lx, "step {}: bf16 loss {ly} strays from fp32 {lx}", x["step"]);
        differs |= lx != ly;
    }
    assert!(differs, "the bf16 run gave the fp32 losses exactly: autocast was not on");
    assert!(b[steps as usize - 1]["loss"].as_f64() < b[0]["loss"].as_f64(), "bf16 training did not learn");
    let last = dir.path().join(format!("bf16/checkpoints/step-{steps:06}"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let dtypes = safetensors_dtypes(&last.join(file));
        assert!(!dtypes.is_empty() && dtypes.iter().all(|d| d == "F32"), "{file}: {dtypes:?}");
    }
}
