//! The custom-loop example runs through the same launcher: the example binary is launched by
//! hand and becomes its own workers.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// `cargo test` builds the examples next to the test binaries' folder.
fn example_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().unwrap();
    test_exe.parent().unwrap().parent().unwrap().join("examples").join(name)
}

#[test]
fn custom_loop_example_trains_through_the_launcher() {
    let exe = example_binary("custom_loop");
    assert!(exe.exists(), "{} not built", exe.display());
    let dir = tempfile::tempdir().unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/custom_loop.toml");
    // The example binary is the launcher: it takes `rtrain launch`'s arguments.
    let launch = || {
        let child = Command::new(&exe)
            .arg(&config)
            .args(["--set", &format!("job.run_dir={}", dir.path().display()), "--set", "train.steps=60"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(Guard(Some(child)), Duration::from_secs(120))
    };
    let out = launch();
    assert!(out.status.success(), "{}", stderr(&out));
    let steps = metrics(&dir.path().join("custom_loop"));
    assert_eq!(steps.len(), 60);
    let first = steps[0]["loss"].as_f64().unwrap();
    let last = steps[59]["loss"].as_f64().unwrap();
    assert!(last < 0.05 * first, "regression converges: {first} -> {last}");
    // The loop is checkpointable: the run ends with a checkpoint of its final step, and a
    // second launch of the same run resumes from it with nothing left to do.
    assert!(dir.path().join("custom_loop/checkpoints/step-000060/model.safetensors").exists());
    let out = launch();
    assert!(out.status.success() && stderr(&out).contains("already complete at step 60"), "{}", stderr(&out));
}
