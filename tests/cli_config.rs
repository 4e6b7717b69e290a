//! `rtrain validate` on every shipped config, and clear errors for bad ones.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn shipped_configs() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("configs/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn every_shipped_config_validates() {
    let configs = shipped_configs();
    assert!(configs.len() >= 4, "expected the shipped configs, found {configs:?}");
    for path in configs {
        // The RL demos start from the model their first phase writes under runs/; on a fresh
        // checkout the architecture folder stands in for it.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut args = vec!["validate", path.to_str().unwrap()];
        if text.contains("path = \"runs/") {
            args.extend(["--set", "model.path=examples/arith/tiny_llama"]);
        }
        let out = run(&args, LIMIT);
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("global batch"));
    }
}

#[test]
fn set_overrides_reach_the_resolved_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.toml", "[train]\nworkers = 2\nmicro_batch = 4");
    let out =
        run(&["validate", cfg.to_str().unwrap(), "--set", "train.workers=3", "--set", "train.grad_accum=2"], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 workers; global batch 24 = 3 × micro_batch 4 × grad_accum 2"), "{stdout}");
}

#[test]
fn bad_configs_fail_with_one_message_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("[train]\nwokers = 2", &[], &["job.toml: train", "unknown field `wokers`", "`workers`"]),
        ("[train]\nworkers = \"two\"", &[], &["train.workers", "an integer, or a table like { min = 1, max = 4 }"]),
        ("[train]\nsteps = \"two\"", &[], &["train.steps", "invalid type"]),
        ("[train]\nworkers = { min = 3, max = 2 }", &[], &["train.workers.max", "at least train.workers.min (3)"]),
        ("[checkpoint]\nmode = \"lowest\"", &[], &["checkpoint.mode", "\"min\" or \"max\""]),
        ("[train]\ntrainer = \"rl\"", &[], &["train.trainer", "\"lm\", \"sft\", \"grpo\", \"ppo\", \"dpo\" or \"rm\""]),
        ("[train]\ntrainer = \"dpo\"", &[], &["model.kind", "cannot learn from preferences"]),
        ("[dpo]\nbeta = 0.1", &[], &["job.toml: dpo", "read only by train.trainer = \"dpo\""]),
        ("[data]\neval_fraction = 0.1", &[], &["data.eval_fraction", "set eval.every too"]),
        ("[eval]\nevery = 5\nbatches = 0", &[], &["eval.batches", "at least 1"]),
        ("[eval]\nevery = 5\n[data]\neval_fraction = 1.0", &[], &["data.eval_fraction", "below 1"]),
        ("[checkpoint]\nmetric = \"eval_loss\"", &[], &["checkpoint.metric", "set eval.every"]),
        (
            "[eval]\nevery = 5\n[data]\neval_path = \"missing.txt\"",
            &[],
            &["data.eval_path", "missing.txt is not a file"],
        ),
        (
            "[eval]\nevery = 4\n[checkpoint]\nmetric = \"eval_loss\"\nevery = 10",
            &[],
            &["checkpoint.every", "multiple of eval.every (4)"],
        ),
        ("[job]\nentrypoint = [\"python3\", \"x.py\"]\n[eval]\nevery = 5", &[], &["eval.every", "evaluates itself"]),
        ("[train]\ntrainer = \"sft\"", &[], &["model.kind", "needs \"hf\" with model.path"]),
        (
            "[train]\ntrainer = \"sft\"\n[model]\nkind = \"hf\"\npath = \"/nonexistent\"",
            &[],
            &["model.path", "no config.json"],
        ),
        ("[train]\nsteps = 0", &[], &["train.steps", "at least 1"]),
        ("[train]\nlr = -1.0", &[], &["train.lr", "positive"]),
        ("[train]\ndevice = \"gpu\"", &[], &["train.device", "\"cuda\""]),
        ("", &["train.workers=zero"], &["train.workers"]),
        ("", &["train.workers"], &["--set train.workers", "key.path=value"]),
        ("[train\nworkers = 2", &[], &["job.toml"]),
    ];
    for (text, sets, expected) in cases {
        let cfg = write_config(dir.path(), "job.toml", text);
        let mut args = vec!["launch", cfg.to_str().unwrap()];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let out = run(&args, LIMIT);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{text:?} {sets:?}: {err}");
        assert!(err.contains("job.toml") || err.contains("--set"), "{err}");
        for needle in *expected {
            assert!(err.contains(needle), "{text:?}: expected `{needle}` in: {err}");
        }
        assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    }
    let out = run(&["validate", "/nonexistent/job.toml"], LIMIT);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/job.toml"));
}

#[test]
fn an_impossible_gang_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.toml", &tiny_gpt("big", dir.path(), 1, 1, 1));
    let out = run(&["launch", cfg.to_str().unwrap(), "--set", "train.workers=4096"], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("4096 CPU cores") && err.contains("train.workers"), "{err}");
    assert!(!dir.path().join("big").join("logs").exists(), "no worker may have been started");
}

#[test]
fn rtrain_alone_validates_and_names_a_missing_worker_binary() {
    // `rtrain` alone in a folder: validating (like launching and checkpoint commands) needs
    // nothing else; the commands that need libtorch say which binary is missing and where.
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("rtrain");
    std::fs::copy(RTRAIN, &alone).unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gpt_demo.toml");
    let out = std::process::Command::new(&alone).args(["validate", config.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out =
        std::process::Command::new(&alone).args(["generate", "--model", "nowhere", "--prompt", "hi"]).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{} is missing", dir.path().join("rtrain-worker").display())), "{err}");
}

#[test]
fn overrides_that_would_overflow_or_be_dropped_are_refused() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gpt_demo.toml");
    for (set, says) in [
        ("rendezvous.timeout_s=1e19", "rendezvous.timeout_s"),
        ("train.collective_timeout_s=1e300", "train.collective_timeout_s"),
        ("train.steps=3\ntrain.lr=2", "one TOML value"),
        ("train.workers={min=1,max=2,foo=3}", "train.workers"),
        ("fault.max_restarts=100000000000", "fault.max_restarts"),
    ] {
        let out =
            common::run(&["validate", config.to_str().unwrap(), "--set", set], std::time::Duration::from_secs(60));
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(says) && !err.contains("panicked"), "{set}: {err}");
    }
}
