//! Supervised fine-tuning through the launcher: loss on response tokens only, the same curve for
//! any split of the global batch, resume, and an exported model that `rtrain generate` opens.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

fn sft_job(dir: &Path, name: &str, workers: u32, grad_accum: u32, steps: u32) -> PathBuf {
    let text = format!(
        r#"
[job]
name = "{name}"
run_dir = "{run_dir}"
seed = 3

[train]
trainer = "sft"
workers = {workers}
steps = {steps}
micro_batch = 4
grad_accum = {grad_accum}
lr = 3e-3
warmup_steps = 2

[model]
kind = "hf"
path = "{model}"

[data]
source = "{data}"
max_len = 48

[checkpoint]
every = 4
"#,
        run_dir = dir.display(),
        model = repo("trainer/tests/fixtures/hf/qwen2_tiny").display(),
        data = repo("examples/data/sft_arith.jsonl").display(),
    );
    write_config(dir, &format!("{name}.toml"), &text)
}

#[test]
fn fine_tuning_matches_across_batch_splits_and_exports_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 12;
    for (name, workers, accum) in [("dp2", 2, 1), ("acc2", 1, 2)] {
        let cfg = sft_job(dir.path(), name, workers, accum, steps);
        let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (a, b) = (metrics(&dir.path().join("dp2")), metrics(&dir.path().join("acc2")));
    assert_eq!(a.len(), steps as usize);
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() < 1e-4 * lx.max(1.0), "step {}: {lx} vs {ly}", x["step"]);
        assert!(x["tokens_per_s"].as_f64().unwrap() * x["step_time_s"].as_f64().unwrap() > 0.0);
    }
    let (first, last) = (a[0]["loss"].as_f64().unwrap(), a[steps as usize - 1]["loss"].as_f64().unwrap());
    assert!(last < 0.5 * first, "the answers are learned: {first} -> {last}");

    // The final model answered the first examples' prompts, for the launch to show.
    let samples: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("dp2/samples.json")).unwrap()).unwrap();
    assert_eq!(samples.len(), 3);
    assert!(samples.iter().all(|s| s["prompt"].is_string() && s["response"].is_string() && s["expected"].is_string()));

    // The exported folder is a Hugging Face model: it loads, generates and scores.
    let model = dir.path().join("dp2/model");
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(model.join(file).exists(), "{file}");
    }
    let out = run(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "What is 2+3?",
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let g: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    // Trained on "<answer><|im_end|>": the first token is a digit or a minus sign.
    let text = g["text"].as_str().unwrap();
    assert!(text.starts_with(|c: char| c.is_ascii_digit() || c == '-'), "{text:?}");
}

#[test]
fn fine_tuning_recovers_from_a_killed_worker_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 120;
    let reference = sft_job(dir.path(), "whole", 2, 1, steps);
    assert!(run(&["launch", reference.to_str().unwrap()], LIMIT).status.success());

    let cfg = sft_job(dir.path(), "killed", 2, 1, steps);
    let run_path = dir.path().join("killed");
    let guard = spawn(&["launch", cfg.to_str().unwrap()]);
    assert!(wait_until(LIMIT, || metrics(&run_path).len() >= 6), "training never started");
    let config_env = format!("RTRAIN_CONFIG={}", run_path.join("config.toml").display());
    let rank1 = processes_with_env(&config_env).into_iter().find(|pid| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        env.split(|b| *b == 0).any(|kv| kv == b"RANK=1")
    });
    // SAFETY: plain syscall on a worker of the run this test started.
    unsafe { libc::kill(rank1.expect("rank 1") as i32, libc::SIGKILL) };
    let out = wait_output(guard, LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&run_path);
    assert_eq!(s["restarts"], 1, "{s}");
    let sha = |run: &str| {
        let path = dir.path().join(run).join(format!("checkpoints/step-{steps:06}/MANIFEST.json"));
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        m["files"].as_array().unwrap().iter().find(|f| f["name"] == "model.safetensors").unwrap()["sha256"].clone()
    };
    assert_eq!(sha("whole"), sha("killed"), "the recovered run ends with the same parameters");
}

#[test]
fn a_bad_jsonl_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"question\": \"x\"}\n").unwrap();
    let cfg = sft_job(dir.path(), "bad", 1, 1, 2);
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", &format!("data.source={}", data.display())], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.jsonl:2") && err.contains("expected {\"prompt\", \"response\"}"), "{err}");
}

#[test]
fn a_failed_export_is_redone_by_the_next_launch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sft_job(dir.path(), "export", 1, 1, 4);
    let run_path = dir.path().join("export");
    // A file where the model folder goes: the export after the final checkpoint fails.
    std::fs::create_dir_all(&run_path).unwrap();
    std::fs::write(run_path.join("model"), "in the way").unwrap();
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", "fault.max_user_restarts=0"], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("export"), "{err}");
    assert!(run_path.join("checkpoints/step-000004").is_dir(), "the final checkpoint was saved");

    std::fs::remove_file(run_path.join("model")).unwrap();
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("its last launch did not finish; running its final stage again"), "{err}");
    assert!(run_path.join("model/config.json").is_file() && run_path.join("model/tokenizer.json").is_file());
    assert_eq!(summary(&run_path)["status"], "finished");
    // Now it is complete: a third launch runs nothing.
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    assert!(stderr(&out).contains("already complete at step 4"), "{}", stderr(&out));
}
