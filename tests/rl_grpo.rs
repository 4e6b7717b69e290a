//! GRPO with real processes: a tiny Llama is fine-tuned from random weights (the demo's first
//! phase, shortened), then post-trained by a trainer fed by two rollout actors over the rollout
//! protocol and kept in sync through shared memory; kill -9 of an actor and of the trainer.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(300);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A model folder fine-tuned briefly on the demo's sums, shared by the tests of this file.
fn base_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let sets = [
                format!("job.run_dir={}", dir.path().display()),
                "train.steps=20".into(),
                "train.cpus_per_worker=1".into(),
            ];
            let out = rtrain_in_repo(&["launch", "configs/grpo_arith_sft.toml"], &sets);
            assert!(out.status.success(), "{}", stderr(&out));
            let model = dir.path().join("arith_sft/model");
            assert!(model.join("config.json").exists());
            (dir, model)
        })
        .1
}

fn rtrain_in_repo(args: &[&str], sets: &[String]) -> std::process::Output {
    wait_output(spawn_in_repo(args, sets), LIMIT)
}

fn spawn_in_repo(args: &[&str], sets: &[String]) -> Guard {
    let mut all: Vec<&str> = args.to_vec();
    for s in sets {
        all.extend(["--set", s]);
    }
    let child = std::process::Command::new(RTRAIN)
        .current_dir(repo())
        .args(&all)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    Guard(Some(child))
}

/// The demo's GRPO config, small: 4 prompts × 4 samples per step, 20 held-out prompts.
fn grpo_sets(run_dir: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("job.run_dir={}", run_dir.display()),
        format!("model.path={}", base_model().display()),
        format!("train.steps={steps}"),
        "rl.prompts_per_step=4".into(),
        "rl.group_size=4".into(),
        "rl.eval_max=20".into(),
        "checkpoint.every=3".into(),
        "fault.backoff_s=0.05".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

/// The trainer's RL metric lines (rank 0's own), by step.
fn rl_metrics(run: &Path) -> Vec<serde_json::Value> {
    metrics(run).into_iter().filter(|m| m["role"] == "trainer" && m.get("reward_mean").is_some()).collect()
}

fn last_rl_step(run: &Path) -> u64 {
    rl_metrics(run).last().and_then(|m| m["step"].as_u64()).unwrap_or(0)
}

fn interrupt(guard: Guard, run: &Path) {
    signal(guard.0.as_ref().unwrap().id(), libc::SIGINT);
    let out = wait_output(guard, LIMIT);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(processes_with_env(&run_env(run)).is_empty(), "processes left behind after Ctrl-C");
}

#[test]
fn grpo_trains_on_actor_rollouts_and_records_the_held_out_scores() {
    let dir = tempfile::tempdir().unwrap();
    let out = rtrain_in_repo(&["launch", "configs/grpo_arith.toml"], &grpo_sets(dir.path(), 6, &[]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("held-out evaluation, greedy (20 prompts)"), "{err}");
    let run = dir.path().join("grpo_arith");
    let s = summary(&run);
    assert_eq!(s["status"], "finished");
    assert_eq!(s["roles"]["rollout"]["size"], 2);
    for which in ["eval_before", "eval_after"] {
        let e = &s["rl"][which];
        assert_eq!(e["prompts"], 20, "{s}");
        assert!(e["accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{s}");
    }
    let steps = rl_metrics(&run);
    assert_eq!(steps.iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
    for m in &steps {
        // Every step trained on exactly its 4 × 4 samples, all from the current policy.
        assert_eq!(m["samples"], 16.0, "{m}");
        assert_eq!(m["staleness_max"], 0.0, "{m}");
        // One pass over one mini-batch: the policy before the update is the behaviour policy
        // (up to float rounding between the actors' and the trainer's forward passes).
        assert!(m["policy_kl"].as_f64().unwrap().abs() < 1e-6, "{m}");
        assert_eq!(m["clip_fraction"], 0.0, "{m}");
        assert!(m["weight_bytes"].as_f64().unwrap() > 10_000.0, "the version's size is reported: {m}");
        for key in ["reward_mean", "reward_std", "accuracy", "entropy", "response_length", "rollout_tokens_per_s"] {
            assert!(m[key].as_f64().is_some_and(f64::is_finite), "{key} in {m}");
        }
    }
    let model = run.join("model");
    assert!(model.join("config.json").exists() && model.join("tokenizer.json").exists(), "no exported model");
}

#[test]
fn killing_an_actor_restarts_it_alone_and_every_step_still_gets_all_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("grpo_arith");
    let guard = spawn_in_repo(&["launch", "configs/grpo_arith.toml"], &grpo_sets(dir.path(), 1_000_000, &[]));
    assert!(wait_until(LIMIT, || last_rl_step(&run) >= 3), "no RL step");
    for kill in 0..3 {
        let rank = kill % 2;
        let victim = pid_of(&run, "rollout", rank).expect("actor running");
        signal(victim, libc::SIGKILL);
        assert!(
            wait_until(LIMIT, || pid_of(&run, "rollout", rank).is_some_and(|p| p != victim)),
            "rollout:{rank} was not restarted"
        );
        let before = last_rl_step(&run);
        assert!(wait_until(LIMIT, || last_rl_step(&run) > before + 2), "training stalled after kill {kill}");
    }
    interrupt(guard, &run);
    let steps = rl_metrics(&run);
    assert!(steps.iter().all(|m| m["attempt"] == 0), "the trainer was restarted");
    for m in &steps {
        assert_eq!(m["samples"], 16.0, "a step lost or doubled samples: {m}");
        assert_eq!(m["staleness_max"], 0.0, "{m}");
    }
    let s = summary(&run);
    assert_eq!(s["roles"]["rollout"]["restarts"], 3, "{s}");
    assert_eq!(s["roles"]["trainer"]["restarts"], 0, "{s}");
}

#[test]
fn killing_the_trainer_resumes_it_and_the_actors_generate_with_the_restored_weights() {
    // Both weight paths: shared memory, and the TCP stream whose server moves with the trainer.
    for sync in ["shm", "tcp"] {
        trainer_restart(sync);
    }
}

fn trainer_restart(sync: &str) {
    let weight_sync = format!("rl.weight_sync=\"{sync}\"");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("grpo_arith");
    let guard =
        spawn_in_repo(&["launch", "configs/grpo_arith.toml"], &grpo_sets(dir.path(), 1_000_000, &[&weight_sync]));
    let saved = |step: &str| run.join("checkpoints").join(step).join("trainer_state.json").exists();
    assert!(wait_until(LIMIT, || saved("step-000003") && last_rl_step(&run) >= 5), "no checkpoint reached");
    let actors = (pid_of(&run, "rollout", 0), pid_of(&run, "rollout", 1));
    signal(pid_of(&run, "trainer", 0).expect("trainer:0"), libc::SIGKILL);
    let back = wait_until(LIMIT, || rl_metrics(&run).iter().filter(|m| m["attempt"] == 1).count() >= 3);
    assert!(back, "the trainer did not come back and train on");
    assert_eq!((pid_of(&run, "rollout", 0), pid_of(&run, "rollout", 1)), actors, "an actor was restarted");
    interrupt(guard, &run);
    let resumed: Vec<_> = rl_metrics(&run).into_iter().filter(|m| m["attempt"] == 1).collect();
    // The first step after the restart is the checkpoint's, and its samples come from the
    // restored weights (staleness 0 under rl.max_staleness = 0), not from the lost attempt's.
    let s = summary(&run);
    let from = s["attempts"][1]["resumed_from_step"].as_u64().expect("resumed from a checkpoint");
    assert!(from >= 3 && from % 3 == 0, "{s}");
    assert_eq!(resumed[0]["step"].as_u64(), Some(from + 1), "the first step after the restart is the checkpoint's");
    assert!(resumed.iter().all(|m| m["staleness_max"] == 0.0 && m["samples"] == 16.0), "{resumed:?}");
    assert_eq!(s["roles"]["rollout"]["restarts"], 0, "{s}");
}

#[test]
fn with_max_staleness_one_generation_runs_ahead_but_never_trains_on_older_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        rtrain_in_repo(&["launch", "configs/grpo_arith.toml"], &grpo_sets(dir.path(), 8, &["rl.max_staleness=1"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let steps = rl_metrics(&dir.path().join("grpo_arith"));
    assert_eq!(steps.len(), 8);
    assert!(steps.iter().all(|m| m["staleness_max"].as_f64().unwrap() <= 1.0), "{steps:?}");
}

#[test]
fn actors_can_take_the_weights_over_the_tcp_stream() {
    // The path actors on other hosts need, exercised on one host: rank 0 serves each version over
    // the authenticated chunked stream, the actors find it in the address book.
    let dir = tempfile::tempdir().unwrap();
    let out =
        rtrain_in_repo(&["launch", "configs/grpo_arith.toml"], &grpo_sets(dir.path(), 6, &["rl.weight_sync=\"tcp\""]));
    assert!(out.status.success(), "{}", stderr(&out));
    let steps = rl_metrics(&dir.path().join("grpo_arith"));
    assert_eq!(steps.len(), 6);
    for m in &steps {
        // The actors generated with the trainer's weights of that version.
        assert!(m["behaviour_gap"].as_f64().unwrap() < 1e-4, "{m}");
        assert_eq!(m["samples"], 16.0, "{m}");
    }
}

#[test]
fn at_a_temperature_the_behaviour_and_trainer_log_probs_are_of_the_tempered_policy() {
    // Actors sample from softmax(logits / T): the log-probs they hand in and the trainer's must
    // be of that distribution, or the importance weights would be off by the temperature.
    let dir = tempfile::tempdir().unwrap();
    let out =
        rtrain_in_repo(&["launch", "configs/grpo_arith.toml"], &grpo_sets(dir.path(), 4, &["rl.temperature=0.5"]));
    assert!(out.status.success(), "{}", stderr(&out));
    for m in rl_metrics(&dir.path().join("grpo_arith")) {
        assert!(m["behaviour_gap"].as_f64().unwrap() < 1e-4, "{m}");
        assert!(m["policy_kl"].as_f64().unwrap().abs() < 1e-6, "{m}");
    }
}

#[test]
fn rl_configs_with_mistakes_are_refused_naming_the_key() {
    let cases: [(&[&str], &str); 6] = [
        (&["rl.group_size=1"], "rl.group_size"),
        (&["rl.colocate=true"], "rl.colocate"),
        (&["rl.prompts_per_step=3", "train.workers=2"], "rl.prompts_per_step"),
        (&["rl.mini_batch=5"], "rl.mini_batch"),
        (&["rl.tis_cap=0.5"], "rl.tis_cap"),
        (&["rl.reward.kind=\"guess\""], "rl.reward.kind"),
    ];
    for (sets, key) in cases {
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sets.push(format!("model.path={}", base_model().display()));
        let out = rtrain_in_repo(&["validate", "configs/grpo_arith.toml"], &sets);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {err}");
        assert!(err.contains(key), "{sets:?} should name {key}: {err}");
    }
}

#[test]
fn ppo_trains_a_critic_and_resumes_it_after_the_trainer_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ppo_arith");
    // Two passes over mini-batches of 2 prompts: the old log-probs and values of a batch are
    // kept across its four updates.
    let sets = grpo_sets(dir.path(), 1_000_000, &["rl.mini_batch=2", "rl.ppo_epochs=2"]);
    let guard = spawn_in_repo(&["launch", "configs/ppo_arith.toml"], &sets);
    let saved = run.join("checkpoints/step-000003/trainer_state.json");
    assert!(wait_until(LIMIT, || saved.exists() && last_rl_step(&run) >= 5), "no PPO checkpoint");
    signal(pid_of(&run, "trainer", 0).expect("trainer:0"), libc::SIGKILL);
    let back = wait_until(LIMIT, || rl_metrics(&run).iter().filter(|m| m["attempt"] == 1).count() >= 2);
    assert!(back, "the PPO trainer did not resume (policy and critic from the checkpoint)");
    interrupt(guard, &run);
    let steps = rl_metrics(&run);
    for m in &steps {
        assert!(m["value_loss"].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0), "no critic loss: {m}");
        assert_eq!(m["samples"], 16.0, "{m}");
    }
    let s = summary(&run);
    assert!(s["attempts"][1]["resumed_from_step"].as_u64().is_some_and(|step| step >= 3), "{s}");
}

#[test]
fn a_trainer_gang_of_two_shares_each_batch_and_trains_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let sets = grpo_sets(dir.path(), 4, &["train.workers=2", "train.cpus_per_worker=0.5", "train.micro_batch=4"]);
    let out = rtrain_in_repo(&["launch", "configs/grpo_arith.toml"], &sets);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("grpo_arith");
    let steps = rl_metrics(&run);
    assert_eq!(steps.len(), 4);
    // Rank 0 reports for the gang: its entropy and clip statistics are sums over both ranks'
    // halves of the batch, and every step had the whole batch.
    assert!(steps.iter().all(|m| m["samples"] == 16.0 && m["entropy"].as_f64().is_some_and(f64::is_finite)));
    assert_eq!(summary(&run)["workers"], 2);
}

#[test]
fn ppo_trains_in_bf16_with_its_critic() {
    // Policy, reference and critic forwards under bf16 autocast; the actors sample in float32, so
    // the trainer's log-probs of their tokens differ a little, and only a little.
    let dir = tempfile::tempdir().unwrap();
    let sets = grpo_sets(dir.path(), 3, &["train.precision=\"bf16\"", "rl.mini_batch=2", "rl.ppo_epochs=2"]);
    let out = rtrain_in_repo(&["launch", "configs/ppo_arith.toml"], &sets);
    assert!(out.status.success(), "{}", stderr(&out));
    let steps = rl_metrics(&dir.path().join("ppo_arith"));
    assert_eq!(steps.len(), 3);
    for m in &steps {
        assert!(m["value_loss"].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0), "{m}");
        let gap = m["behaviour_gap"].as_f64().unwrap();
        // In float32 the gap is ~1e-7 (the same weights); bf16 rounding shows, and stays small.
        assert!(gap > 1e-5 && gap < 0.1, "bf16 trainer against float32 actors: {m}");
        assert_eq!(m["samples"], 16.0, "{m}");
    }
}
