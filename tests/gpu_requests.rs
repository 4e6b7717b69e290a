//! Asking for a GPU on a machine without one (this CI machine: no NVIDIA driver, no CUDA build of
//! PyTorch) fails at once with a message that says what is missing and how to fix it: a clean
//! exit code, never a panic (101) and never a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("trainer/tests/fixtures/hf").join(name)
}

/// Runs `rtrain` with `env` set and RTRAIN_TORCH_LIB removed unless `env` sets it.
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(RTRAIN);
    cmd.args(args).env_remove("RTRAIN_TORCH_LIB").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    wait_output(Guard(Some(cmd.spawn().expect("start rtrain"))), LIMIT)
}

fn assert_clean_failure(out: &Output, code: i32) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn generate_on_a_gpu_without_cuda_says_what_is_missing() {
    let m = model("llama_tiny");
    let out = run_with_env(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi", "--cuda", "0"], &[]);
    let err = assert_clean_failure(&out, 1);
    assert!(err.contains("--cuda 0"), "{err}");
    assert!(err.contains("libtorch_cuda.so"), "{err}");
    assert!(err.contains("RTRAIN_TORCH_LIB"), "{err}");
    assert!(err.contains("pip install torch==2.11.0"), "{err}");
}

#[test]
fn score_on_a_gpu_names_the_folder_it_was_pointed_at() {
    let m = model("llama_tiny");
    let out = run_with_env(
        &["score", "--model", m.to_str().unwrap(), "--text", "hi", "--cuda", "1"],
        &[("RTRAIN_TORCH_LIB", "/nonexistent/torch/lib")],
    );
    let err = assert_clean_failure(&out, 1);
    assert!(err.contains("/nonexistent/torch/lib/libtorch_cuda.so: no such file"), "{err}");
}

#[test]
fn nccl_allreduce_benchmark_without_gpus_fails_fast() {
    let out = run_with_env(&["bench", "allreduce", "--backend", "nccl", "--ranks", "2", "--iters", "1"], &[]);
    let err = assert_clean_failure(&out, 1);
    assert!(err.contains("--backend nccl"), "{err}");
    assert!(err.contains("libtorch_cuda.so"), "{err}");
    assert!(err.contains("use --backend shm or tcp on CPU"), "{err}");
    let unknown = run_with_env(&["bench", "allreduce", "--backend", "gloo"], &[]);
    let err = assert_clean_failure(&unknown, 2);
    assert!(err.contains("use shm, tcp or nccl"), "{err}");
}

#[test]
fn training_on_cuda_without_gpus_is_refused_before_any_worker_starts() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let text = tiny_gpt("cuda-here", &run_dir, 1, 1, 2).replace("[train]\n", "[train]\ndevice = \"cuda\"\n");
    let config = write_config(dir.path(), "job.toml", &text);
    // No GPU is visible here whatever the machine has.
    let out = run_with_env(&["launch", config.to_str().unwrap()], &[("CUDA_VISIBLE_DEVICES", "")]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
    assert!(err.contains("GPU"), "{err}");
    assert!(err.contains("train.device = \"cpu\""), "{err}");
    assert!(!err.contains("restart"), "no attempt is made, so none is retried: {err}");
}
