//! Reward-model training and DPO through the launcher: real worker processes, held-out scores,
//! the same losses for any split of the batch, exported models, exact recovery from kill -9, and
//! refused settings and data.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rtrain_trainer::hf::RewardModel;

const LIMIT: Duration = Duration::from_secs(240);

/// Pairs on two-digit sums where the answer alone beats the answer with text after it.
fn write_pairs(dir: &Path, n: usize) -> PathBuf {
    let mut lines = String::new();
    for i in 0..n {
        let (a, b) = (10 + (i * 37) % 90, 10 + (i * 53) % 90);
        let junk = ["+1", " x", "--", " 7"][i % 4];
        lines +=
            &format!("{{\"prompt\": \"{a}+{b}=\", \"chosen\": \"{}\", \"rejected\": \"{}{junk}\"}}\n", a + b, a + b);
    }
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn job(dir: &Path, name: &str, trainer: &str, workers: u32, grad_accum: u32, steps: u32) -> PathBuf {
    let dpo = if trainer == "dpo" { "[dpo]\nbeta = 0.5\n" } else { "" };
    let text = format!(
        r#"
[job]
name = "{name}"
run_dir = "{run_dir}"
seed = 5

[train]
trainer = "{trainer}"
workers = {workers}
steps = {steps}
micro_batch = 4
grad_accum = {grad_accum}
lr = 2e-3
warmup_steps = 2

[model]
kind = "hf"
path = "{model}"

[data]
source = "{data}"
max_len = 32
eval_fraction = 0.1

{dpo}
[checkpoint]
every = 5
"#,
        run_dir = dir.display(),
        model = repo("trainer/tests/fixtures/hf/llama_tiny").display(),
        data = dir.join("pairs.jsonl").display(),
    );
    write_config(dir, &format!("{name}.toml"), &text)
}

fn launch(cfg: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["launch", cfg.to_str().unwrap()];
    for s in extra {
        args.extend(["--set", s]);
    }
    run(&args, LIMIT)
}

fn eval(run: &Path, key: &str) -> serde_json::Value {
    summary(run)["preference"][key].clone()
}

#[test]
fn a_reward_model_learns_the_pairs_and_exports_a_classifier() {
    let dir = tempfile::tempdir().unwrap();
    write_pairs(dir.path(), 200);
    let cfg = job(dir.path(), "rm", "rm", 2, 1, 40);
    let out = launch(&cfg, &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("held-out preference pairs (20 pairs)"), "{err}");
    let run = dir.path().join("rm");
    let (before, after) = (eval(&run, "eval_before"), eval(&run, "eval_after"));
    assert_eq!(before["pairs"], 20);
    let acc = |e: &serde_json::Value| e["accuracy"].as_f64().unwrap();
    assert!(acc(&after) >= 0.9 && acc(&after) > acc(&before), "held-out accuracy {before} -> {after}");
    assert!(after["margin"].as_f64().unwrap() > before["margin"].as_f64().unwrap());
    let m = metrics(&run);
    assert_eq!(m.iter().filter(|r| r.get("loss").is_some()).count(), 40);
    let last = m.iter().rev().find(|r| r.get("accuracy").is_some()).unwrap();
    assert!(last["margin"].is_f64() && last["chosen_reward"].is_f64() && last["rejected_reward"].is_f64(), "{last}");
    assert!(m.iter().any(|r| r.get("eval_accuracy").is_some()), "held-out scores reach metrics.jsonl");

    // The export is a one-label sequence classifier whose scores rank the held-out pairs as the
    // trainer did.
    let model = run.join("model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    let rm = RewardModel::load(&model, tch::Device::Cpu).unwrap();
    let tok = rtrain_trainer::hf::Tokenizer::from_dir(&model).unwrap();
    let render = |prompt: &str, response: &str| {
        let messages = [
            rtrain_trainer::hf::ChatMessage { role: "user".into(), content: prompt.into() },
            rtrain_trainer::hf::ChatMessage { role: "assistant".into(), content: response.into() },
        ];
        tok.encode(&tok.apply_chat_template(&messages, false).unwrap(), false).unwrap()
    };
    let scores = rm.score(&[render("41+22=", "63"), render("41+22=", "63 x")]).unwrap();
    assert!(scores[0] > scores[1], "the exported model prefers the answer alone: {scores:?}");
}

#[test]
fn dpo_starts_at_log_two_and_its_loss_does_not_depend_on_the_split() {
    let dir = tempfile::tempdir().unwrap();
    write_pairs(dir.path(), 120);
    let steps = 12;
    for (name, workers, accum) in [("dp2", 2, 1), ("acc2", 1, 2)] {
        let out = launch(&job(dir.path(), name, "dpo", workers, accum, steps), &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let loss = |run: &str| -> Vec<f64> {
        metrics(&dir.path().join(run)).iter().filter_map(|r| r.get("loss").and_then(|l| l.as_f64())).collect()
    };
    let (a, b) = (loss("dp2"), loss("acc2"));
    assert_eq!(a.len(), steps as usize);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-4 * x.max(1.0), "step {}: {x} vs {y}", step + 1);
    }
    // The policy starts as its reference: every log-ratio is 0 and the loss is log 2.
    assert!((a[0] - 2f64.ln()).abs() < 1e-5, "first loss {}", a[0]);
    assert!(a[steps as usize - 1] < a[0], "DPO lowers the loss: {a:?}");
    let run = dir.path().join("dp2");
    let after = eval(&run, "eval_after");
    assert!(after["margin"].as_f64().unwrap() > 0.0 && after["chosen_reward"].is_f64(), "{after}");
    assert_eq!(eval(&run, "eval_before")["margin"], 0.0, "before training the implicit rewards are all 0");
    let config = std::fs::read_to_string(run.join("model/config.json")).unwrap();
    assert!(config.contains("LlamaForCausalLM"), "DPO exports the policy: {config}");
}

/// Under bf16 autocast the reference log-probs are computed in the precision the policy trains
/// in: before the first update every log-ratio is still exactly 0.
#[test]
fn dpo_in_bf16_starts_at_log_two() {
    let dir = tempfile::tempdir().unwrap();
    write_pairs(dir.path(), 40);
    let out = launch(&job(dir.path(), "bf16", "dpo", 1, 1, 2), &["train.precision=\"bf16\""]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("bf16");
    let losses: Vec<f64> = metrics(&run).iter().filter_map(|r| r.get("loss").and_then(|l| l.as_f64())).collect();
    let first = losses[0];
    assert!((first - 2f64.ln()).abs() < 1e-6, "first loss {first}");
    assert_eq!(eval(&run, "eval_before")["margin"], 0.0, "before training the implicit rewards are all 0");
}

#[test]
fn killed_preference_workers_recover_exactly() {
    let dir = tempfile::tempdir().unwrap();
    write_pairs(dir.path(), 120);
    let steps = 40;
    for trainer in ["dpo", "rm"] {
        let whole = job(dir.path(), &format!("{trainer}_whole"), trainer, 2, 1, steps);
        assert!(launch(&whole, &[]).status.success());
        let cfg = job(dir.path(), &format!("{trainer}_killed"), trainer, 2, 1, steps);
        let run_path = dir.path().join(format!("{trainer}_killed"));
        let guard = spawn(&["launch", cfg.to_str().unwrap()]);
        // After a checkpoint (every 5 steps), so the restart resumes from one.
        let started = wait_until(LIMIT, || metrics(&run_path).iter().filter(|r| r.get("loss").is_some()).count() >= 7);
        assert!(started, "{trainer}: training never started");
        signal(pid_of(&run_path, "trainer", 1).expect("rank 1"), libc::SIGKILL);
        let out = wait_output(guard, LIMIT);
        assert!(out.status.success(), "{trainer}: {}", stderr(&out));
        assert_eq!(summary(&run_path)["restarts"], 1);
        let sha = |run: &str| {
            let path = dir.path().join(run).join(format!("checkpoints/step-{steps:06}/MANIFEST.json"));
            let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            m["files"].as_array().unwrap().iter().find(|f| f["name"] == "model.safetensors").unwrap()["sha256"].clone()
        };
        assert_eq!(sha(&format!("{trainer}_whole")), sha(&format!("{trainer}_killed")), "{trainer}: same parameters");
    }
}

#[test]
fn bad_preference_settings_and_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    write_pairs(dir.path(), 20);
    let dpo = job(dir.path(), "bad", "dpo", 1, 1, 2);
    let rm = job(dir.path(), "badrm", "rm", 1, 1, 2);
    let cases: &[(&Path, &[&str], &[&str])] = &[
        (&dpo, &["dpo.label_smoothing=0.1"], &["dpo.label_smoothing", "loss = \"robust\""]),
        (&dpo, &["dpo.loss=\"robust\""], &["dpo.label_smoothing", "must be above 0"]),
        (&dpo, &["dpo.beta=0"], &["dpo.beta", "above 0"]),
        (&dpo, &["dpo.loss=\"hinge\""], &["dpo.loss", "\"sigmoid\", \"robust\" or \"ipo\""]),
        (&dpo, &["data.eval_fraction=1.5"], &["data.eval_fraction", "below 1"]),
        (&dpo, &["data.eval_path=\"x.jsonl\""], &["data.eval_fraction", "not both"]),
        (&rm, &["dpo.beta=0.2"], &["dpo", "read only by train.trainer = \"dpo\""]),
        (&rm, &["model.init=\"random\""], &["model.init", "starts from trained weights"]),
    ];
    for (cfg, sets, expected) in cases {
        let out = launch(cfg, sets);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {err}");
        for needle in *expected {
            assert!(err.contains(needle), "{sets:?}: expected `{needle}` in: {err}");
        }
    }
    // A line that is not a pair fails the job naming file and line.
    let data = dir.path().join("broken.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"1+1=\", \"chosen\": \"2\", \"rejected\": \"3\"}\n{\"prompt\": \"x\", \"chosen\": \"2\"}\n",
    )
    .unwrap();
    let out = launch(&rm, &[&format!("data.source=\"{}\"", data.display()), "fault.max_user_restarts=0"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.jsonl:2") && err.contains("missing field `rejected`"), "{err}");
}
