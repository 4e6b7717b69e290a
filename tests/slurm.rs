//! Slurm: a real cluster of two nodes on this machine (slurmctld, two slurmd and munged from
//! Debian's packages, started by tests/scripts/slurm_cluster.sh and stopped afterwards).
//! `rtrain slurm submit` writes and submits the batch script; inside the allocation `rtrain
//! launch` finds the nodes with scontrol, starts an agent on the second with srun and trains over
//! both. Needs root and the packages, which scripts/test.sh installs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The cluster; stopped when dropped.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Option<Self> {
        let root = unsafe { libc::geteuid() } == 0;
        let tools = ["slurmctld", "slurmd", "munged", "sbatch"].iter().all(|t| {
            Command::new("sh").args(["-c", &format!("command -v {t}")]).output().is_ok_and(|o| o.status.success())
        });
        if !(root && tools) {
            let why = "the Slurm test needs root, slurm-wlm and munge (scripts/test.sh installs them)";
            assert!(std::env::var_os("RTRAIN_TEST_REQUIRE_ALL").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return None;
        }
        let cluster = Cluster { dir: dir.to_path_buf() };
        let out = Command::new("bash")
            .arg(repo("tests/scripts/slurm_cluster.sh"))
            .args(["start", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "the Slurm cluster did not start: {}", String::from_utf8_lossy(&out.stderr));
        Some(cluster)
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("env")
            .arg(format!("SLURM_CONF={}", self.conf().display()))
            .args(["scancel", "--user=root"])
            .status();
        let _ = Command::new("bash").arg(repo("tests/scripts/slurm_cluster.sh")).arg("stop").arg(&self.dir).status();
    }
}

#[test]
fn a_job_submitted_to_slurm_trains_over_the_allocations_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(cluster) = Cluster::start(&d.join("slurm")) else { return };
    let mut text =
        tiny_gpt("sl", &d.join("runs"), 2, 1, 20).replace("workers = 2\n", "workers = 2\ncpus_per_worker = 0.5\n");
    text.push_str("\n[rendezvous]\ntimeout_s = 60\n");
    let config = write_config(d, "sl.toml", &text);
    let rtrain = |args: &[&str]| {
        Command::new(RTRAIN).args(args).env("SLURM_CONF", cluster.conf()).current_dir(d).output().expect("run rtrain")
    };

    let dry = rtrain(&["slurm", "submit", config.to_str().unwrap(), "--nodes", "2", "--time", "10:00", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let script = stdout(&dry);
    // Each node's share of the gang (one worker of half a core) and a core for rtrain itself.
    let lines = [
        "#SBATCH --nodes=2",
        "#SBATCH --time=10:00",
        "#SBATCH --cpus-per-task=2",
        &format!("launch {}", config.display()),
    ];
    for line in lines {
        assert!(script.contains(line), "{line} missing from:\n{script}");
    }
    assert!(!d.join("runs/sl.sbatch").exists(), "a dry run writes nothing");

    let out = rtrain(&["slurm", "submit", config.to_str().unwrap(), "--nodes", "2", "--time", "10:00"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out) + &stdout(&out);
    let id =
        said.split("submitted Slurm job ").nth(1).and_then(|t| t.split_whitespace().next()).expect(&said).to_string();
    assert_eq!(std::fs::read_to_string(d.join("runs/sl.sbatch")).unwrap(), script);

    let run = d.join("runs/sl");
    let output = d.join(format!("runs/sl.slurm-{id}.out"));
    let done = wait_until(Duration::from_secs(240), || run.join("summary.json").exists());
    let log = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(done, "the batch job did not finish:\n{log}");
    let summary = summary(&run);
    assert_eq!(summary["status"], "finished", "{summary}\n{log}");
    assert_eq!(summary["workers"], 2);
    // One rank on each node: the driver's on n1, the agent's on n2.
    assert!(log.contains("starting an agent on each of n2 with srun"), "{log}");
    assert!(log.contains("hosts: this one and n2"), "{log}");
    let agents = std::fs::read_to_string(run.join("logs/agents.log")).unwrap_or_default();
    assert!(agents.contains("joined") && agents.contains("as n2"), "{agents}");
    let rank1 = std::fs::read_to_string(run.join("logs/attempt-0/trainer-1.log")).unwrap();
    assert!(rank1.contains("backend=\"hierarchical\""), "{rank1}");
}
