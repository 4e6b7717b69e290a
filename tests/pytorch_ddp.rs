//! The PyTorch DDP example (`examples/pytorch_ddp/train.py`, torch.distributed with gloo) under
//! rtrain: live progress and prefixed output from the script's reports, and after kill -9 of a
//! rank the gang resumes from the script's own checkpoint. Needs `python3` with torch; without
//! it the test says so and checks nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(240);

fn torch_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import torch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `rtrain launch configs/pytorch_ddp.toml` into `run_dir`, with `--set` of each of `settings`.
fn launch_args(run_dir: &Path, settings: &[String]) -> Vec<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = vec!["launch".to_string(), repo.join("configs/pytorch_ddp.toml").display().to_string()];
    let common = [
        format!("job.run_dir=\"{}\"", run_dir.display()),
        format!("job.entrypoint=[\"python3\", \"{}\"]", repo.join("examples/pytorch_ddp/train.py").display()),
        format!("job.env.PYTHONPATH=\"{}\"", repo.join("python").display()),
    ];
    for s in common.iter().chain(settings) {
        args.extend(["--set".to_string(), s.clone()]);
    }
    args
}

#[test]
fn a_pytorch_ddp_script_reports_and_resumes_after_kill_9() {
    if !torch_available() {
        eprintln!("SKIPPED: python3 cannot import torch here, so the PyTorch DDP example was not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_path = dir.path().join("pytorch_ddp");
    let settings = ["train.steps=120".into(), "user.checkpoint_every=20".into(), "user.pause_s=0.05".into()];
    let cmd = launch_args(dir.path(), &settings);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let guard = spawn(&cmd);
    let steps = || metrics(&run_path).iter().filter(|m| m.get("loss").is_some()).count();
    assert!(wait_until(LIMIT, || steps() >= 50), "the script never reported 50 steps");
    signal(pid_of(&run_path, "trainer", 1).expect("rank 1"), libc::SIGKILL);
    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("trainer:0| rank 0: step 20 loss"), "rank 0's output is shown live: {err}");
    assert!(err.contains("trainer:0| rank 0: resumed from step-0000"), "{err}");
    assert!(err.contains("pytorch_ddp finished: 120 steps"), "{err}");
    let s = summary(&run_path);
    assert_eq!(s["restarts"], 1, "{s}");
    let lines = metrics(&run_path);
    let losses: Vec<f64> = lines.iter().filter_map(|m| m.get("loss").and_then(|l| l.as_f64())).collect();
    assert!(
        losses.last().unwrap() < &(0.5 * losses[0]),
        "the model learns: {} -> {}",
        losses[0],
        losses.last().unwrap()
    );
}

/// `rtrain stop` on the script: SIGTERM, caught through `rtrain.stop_requested()`; every rank
/// saves at the end of the same step, and the next launch resumes there.
#[test]
fn a_stopped_pytorch_ddp_script_saves_its_step_and_resumes_from_it() {
    if !torch_available() {
        eprintln!("SKIPPED: python3 cannot import torch here, so the PyTorch DDP example was not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_path = dir.path().join("pytorch_ddp");
    let settings = ["train.steps=100000".into(), "user.checkpoint_every=100000".into(), "user.pause_s=0.02".into()];
    let cmd = launch_args(dir.path(), &settings);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let guard = spawn(&cmd);
    let steps = || metrics(&run_path).iter().filter(|m| m.get("loss").is_some()).count();
    assert!(wait_until(LIMIT, || steps() >= 30), "the script never reported 30 steps");
    let out = run(&["stop", run_path.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let launch = wait_output(guard, LIMIT);
    assert_eq!(launch.status.code(), Some(128 + libc::SIGTERM), "{}", stderr(&launch));
    let last = metrics(&run_path).iter().filter_map(|m| m["step"].as_u64()).max().unwrap();
    assert!(run_path.join(format!("checkpoints/step-{last:06}/MANIFEST.json")).exists(), "step {last} saved");
    let log = std::fs::read_to_string(run_path.join("logs/attempt-0/trainer-1.log")).unwrap();
    assert!(log.contains(&format!("rank 1: stopped on request at step {last}")), "{log}");

    let settings = [format!("train.steps={}", last + 3), "user.checkpoint_every=100000".into()];
    let cmd = launch_args(dir.path(), &settings);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let again = run(&cmd, LIMIT);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains(&format!("resumed from step-{last:06}")), "{}", stderr(&again));
}
