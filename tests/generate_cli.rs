//! `rtrain generate` and `rtrain score` as a user runs them, on the tiny transformers fixtures.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("trainer/tests/fixtures/hf").join(name)
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

#[test]
fn generate_prints_one_object_per_sequence() {
    let m = model("llama_tiny");
    let args = ["generate", "--model", m.to_str().unwrap(), "--prompt", "The quick brown fox", "--max-new-tokens", "8"];
    let greedy = run(&[&args[..], &["--temperature", "0", "--json"]].concat(), LIMIT);
    assert!(greedy.status.success(), "{}", stderr(&greedy));
    let g = json_lines(&greedy);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0]["token_ids"].as_array().unwrap().len(), 8);
    assert_eq!(g[0]["logprobs"].as_array().unwrap().len(), 8);
    assert!(g[0]["logprobs"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert_eq!(g[0]["finish_reason"], "length");
    assert!(g[0]["text"].is_string());

    let sampled = |seed: &str| {
        let out = run(
            &[
                &args[..],
                &[
                    "--temperature",
                    "1.0",
                    "--top-k",
                    "50",
                    "--top-p",
                    "0.9",
                    "--num-samples",
                    "3",
                    "--seed",
                    seed,
                    "--json",
                ],
            ]
            .concat(),
            LIMIT,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        json_lines(&out)
    };
    let (a, b) = (sampled("5"), sampled("5"));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "seeded sampling is reproducible");

    let chat = run(&[&args[..], &["--temperature", "0", "--chat"]].concat(), LIMIT);
    assert!(chat.status.success(), "{}", stderr(&chat));
}

#[test]
fn score_prints_one_object_per_token() {
    let m = model("qwen2_tiny");
    let out = run(&["score", "--model", m.to_str().unwrap(), "--text", "Hello world! It's a test", "--json"], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let tokens = json_lines(&out);
    assert!(tokens.len() > 5);
    assert!(tokens[0]["logprob"].is_null());
    assert_eq!(tokens[0]["token"], "H");
    assert!(tokens[1..].iter().all(|t| t["logprob"].as_f64().is_some_and(|l| l <= 0.0) && t["token_id"].is_u64()));
}

#[test]
fn a_bad_model_folder_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["generate", "--model", dir.path().to_str().unwrap(), "--prompt", "x"], LIMIT);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("config.json") && !err.contains("panicked"), "{err}");
}

#[test]
fn nonsense_sampling_settings_are_refused_before_loading_anything() {
    let m = model("llama_tiny");
    let base = ["generate", "--model", m.to_str().unwrap(), "--prompt", "hi"];
    for (extra, says) in [
        (&["--temperature", "nan"][..], "--temperature"),
        (&["--temperature=-1"][..], "--temperature"),
        (&["--top-p", "nan"][..], "--top-p"),
        (&["--stop", ""][..], "--stop"),
        (&["--num-samples", "0"][..], "--num-samples"),
    ] {
        let out = run(&[&base[..], extra].concat(), LIMIT);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says) && !err.contains("panicked"), "{extra:?}: {err}");
    }
}

#[test]
fn a_printing_command_ends_quietly_when_its_reader_goes_away() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let m = model("llama_tiny");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gpt_demo.toml");
    for args in [
        vec!["validate", config.to_str().unwrap()],
        vec!["score", "--model", m.to_str().unwrap(), "--text", "The quick brown fox", "--json"],
    ] {
        // A pipe whose reading end is closed before the command writes: every write fails.
        let mut fds = [0; 2];
        // SAFETY: pipe fills two new descriptors, owned below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        let child = std::process::Command::new(RTRAIN)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(write))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_output(Guard(Some(child)), LIMIT);
        let err = stderr(&out);
        assert!(!err.contains("panicked") && out.status.code() != Some(101), "{args:?}: {:?} {err}", out.status);
    }
}

#[test]
fn bench_generate_draws_prompt_ids_inside_a_small_vocabulary() {
    // gpt2_tiny cut to 14 tokens: its (tied) embedding keeps its first 14 rows.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model("gpt2_tiny")).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let weights = dir.path().join("model.safetensors");
    let cut: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .map(|(name, t)| if name.ends_with("wte.weight") { (name, t.narrow(0, 0, 14)) } else { (name, t) })
        .collect();
    tch::Tensor::write_safetensors(&cut, &weights).unwrap();
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["vocab_size"] = 14.into();
    std::fs::write(&config_path, config.to_string()).unwrap();

    let m = dir.path().to_str().unwrap();
    let args =
        ["bench", "generate", "--model", m, "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"];
    let out = run(&args, LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    // A prompt id past the vocabulary is an error with a message, not a panic in the embedding.
    let out = run(&["score", "--model", m, "--text", "The quick brown fox", "--json"], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("past the model's vocabulary of 14 tokens"), "{err}");
}

/// The built-in GPT generates from its run (the newest checkpoint) or a checkpoint directory:
/// greedily, exactly what the trained model wrote at the end of its launch.
#[test]
fn generate_continues_text_from_a_gpt_run_or_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_gpt("gen", dir.path(), 1, 1, 12) + "\n[checkpoint]\nevery = 6\n";
    let cfg = write_config(dir.path(), "job.toml", &text);
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let run_path = dir.path().join("gen");
    let samples: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_path.join("samples.json")).unwrap()).unwrap();
    let (prompt, response) = (samples[0]["prompt"].as_str().unwrap(), samples[0]["response"].as_str().unwrap());
    let n = response.len().to_string();
    for source in [run_path.clone(), run_path.join("checkpoints/step-000012")] {
        let args = ["generate", "--model", source.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", &n];
        let out = run(&[&args[..], &["--temperature", "0", "--json"]].concat(), LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
        let g = json_lines(&out);
        assert_eq!(g[0]["text"], response, "from {}", source.display());
        assert_eq!(g[0]["token_ids"].as_array().unwrap().len(), response.len());
        assert_eq!(g[0]["finish_reason"], "length");
        // Sampling draws from the seed: the same seed, the same text.
        let sampled = |seed: &str| {
            let out = run(&[&args[..], &["--seed", seed, "--json"]].concat(), LIMIT);
            json_lines(&out)[0]["text"].clone()
        };
        assert_eq!(sampled("7"), sampled("7"));
    }
    // The run also exports the model as a Hugging Face GPT-2 folder whose tokens are the bytes:
    // loaded through the Hugging Face path (its own tokenizer and KV cache), it writes what the
    // checkpoint writes (within the 16 positions of this model).
    let exported = run_path.join("model");
    let short = &prompt[..6];
    let greedy = |model: &Path| {
        let args = ["generate", "--model", model.to_str().unwrap(), "--prompt", short, "--max-new-tokens", "8"];
        let out = run(&[&args[..], &["--temperature", "0", "--json"]].concat(), LIMIT);
        assert!(out.status.success(), "{}: {}", model.display(), stderr(&out));
        json_lines(&out)[0]["text"].as_str().unwrap().to_string()
    };
    let continuation = greedy(&exported);
    assert_eq!(continuation, greedy(&run_path));
    assert_eq!(continuation.len(), 8);
    // transformers loads the export the same way, where it is installed.
    let has_transformers = std::process::Command::new("python3")
        .args(["-c", "import transformers, torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_transformers {
        let score = run(&["score", "--model", exported.to_str().unwrap(), "--text", prompt, "--json"], LIMIT);
        assert!(score.status.success(), "{}", stderr(&score));
        let scores = dir.path().join("score.jsonl");
        std::fs::write(&scores, &score.stdout).unwrap();
        let check = std::process::Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/check_gpt_export.py"))
            .args([exported.as_os_str(), scores.as_os_str()])
            .args([prompt, short, continuation.as_str()])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    } else {
        eprintln!("SKIPPED the transformers half: python3 cannot import transformers and torch here");
    }

    let stop = run(
        &["generate", "--model", run_path.to_str().unwrap(), "--prompt", prompt, "--temperature", "0", "--stop", " "],
        LIMIT,
    );
    let printed = String::from_utf8_lossy(&stop.stdout);
    assert!(!printed.trim_end().strip_prefix(prompt).unwrap_or(" ").contains(' '), "cut before the stop: {printed}");

    // A damaged newest checkpoint: named and skipped for the run, refused by itself.
    let model = run_path.join("checkpoints/step-000012/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let damaged = run(
        &["generate", "--model", run_path.join("checkpoints/step-000012").to_str().unwrap(), "--prompt", "x"],
        LIMIT,
    );
    assert_eq!(damaged.status.code(), Some(1));
    assert!(stderr(&damaged).contains("does not match its manifest"), "{}", stderr(&damaged));
    let older =
        run(&["generate", "--model", run_path.to_str().unwrap(), "--prompt", "x", "--max-new-tokens", "2"], LIMIT);
    assert!(older.status.success(), "{}", stderr(&older));
    assert!(
        stderr(&older).contains("warning: skipping") && stderr(&older).contains("step-000012"),
        "{}",
        stderr(&older)
    );

    let chat = run(&["generate", "--model", run_path.to_str().unwrap(), "--prompt", "x", "--chat"], LIMIT);
    assert_eq!(chat.status.code(), Some(2));
    assert!(stderr(&chat).contains("needs a chat template"), "{}", stderr(&chat));
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("checkpoints")).unwrap();
    let none = run(&["generate", "--model", empty.to_str().unwrap(), "--prompt", "x"], LIMIT);
    assert!(stderr(&none).contains("has no checkpoint that verifies"), "{}", stderr(&none));
}
