//! `[metrics] tensorboard = true`: the run's metrics as TensorBoard event files, read back by
//! TensorBoard's own event reader (the `tensorboard` Python package in the test environment that
//! scripts/test.sh installs; without it the test says so and checks nothing).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

/// The Python that has TensorBoard: `RTRAIN_TEST_PYTHON`, or scripts/test.sh's environment.
fn tensorboard_python() -> Option<PathBuf> {
    let python = std::env::var_os("RTRAIN_TEST_PYTHON")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/rtrain/test-venv/bin/python")))?;
    let ok = std::process::Command::new(&python)
        .args(["-c", "import tensorboard"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

#[test]
fn tensorboard_reads_every_step_of_the_run() {
    let Some(python) = tensorboard_python() else {
        assert!(
            std::env::var_os("RTRAIN_TEST_REQUIRE_ALL").is_none(),
            "no Python with tensorboard, though scripts/test.sh installs one"
        );
        eprintln!(
            "SKIPPED: no Python with the tensorboard package (bash scripts/test.sh installs one in \
             ~/.cache/rtrain/test-venv; or set RTRAIN_TEST_PYTHON)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_gpt("tb", dir.path(), 2, 1, 12) + "\n[metrics]\ntensorboard = true\n";
    let cfg = write_config(dir.path(), "job.toml", &text);
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let run_path = dir.path().join("tb");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/read_tensorboard.py");
    let read = std::process::Command::new(&python).arg(&script).arg(run_path.join("tensorboard")).output().unwrap();
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let scalars: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    let steps = metrics(&run_path);
    for tag in ["loss", "lr", "tokens_per_s", "grad_norm"] {
        let series = scalars[format!("trainer/{tag}")].as_array().unwrap_or_else(|| panic!("trainer/{tag}: {scalars}"));
        assert_eq!(series.len(), steps.len(), "trainer/{tag}");
        for (point, m) in series.iter().zip(&steps) {
            assert_eq!(point[0], m["step"], "trainer/{tag}");
            let (got, want) = (point[1].as_f64().unwrap(), m[tag].as_f64().unwrap());
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "trainer/{tag} step {}: {got} vs {want}",
                m["step"]
            );
        }
    }
}
