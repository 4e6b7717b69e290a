//! The run directory on a disk that fills up: metrics.jsonl keeps whole lines only, and
//! summary.json is whole or absent. Needs a tmpfs of its own (root); skipped, saying why,
//! where it cannot mount one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use rtrain_launcher::config::JobConfig;
use rtrain_launcher::proto::StepMetrics;
use rtrain_launcher::run_dir::RunDir;

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_cuts_no_metrics_line_and_leaves_no_partial_summary() {
    let dir = tempfile::tempdir().unwrap();
    // Four pages: the config, the lock file, and two pages of metrics.
    let _disk = match Tmpfs::mount(dir.path(), "16k") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: needs a small tmpfs of its own: {why}");
            return;
        }
    };
    let mut run = RunDir::open(&dir.path().join("run"), &JobConfig::default(), false).unwrap();
    let mut written = 0u64;
    let failure = loop {
        let m = StepMetrics { step: written + 1, loss: 1.0 / (written + 1) as f64, ..Default::default() };
        match run.record_step(&m, 0, 0) {
            Ok(()) => written += 1,
            Err(e) => break e.to_string(),
        }
        assert!(written < 100_000, "the disk never filled");
    };
    assert!(failure.contains("No space left on device") && failure.contains("metrics.jsonl"), "{failure}");
    let text = std::fs::read_to_string(run.path.join("metrics.jsonl")).unwrap();
    assert!(text.ends_with('\n'), "a partial last line: {:?}", &text[text.len().saturating_sub(80)..]);
    let steps: Vec<u64> =
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=written).collect::<Vec<_>>());

    let err = run.write_summary(&serde_json::json!({ "status": "finished", "pad": "x".repeat(20_000) })).unwrap_err();
    assert!(err.to_string().contains("summary.json"), "{err}");
    assert!(!run.path.join("summary.json.tmp").exists(), "a partial summary.json.tmp is left");
    assert!(!run.path.join("summary.json").exists());
}
