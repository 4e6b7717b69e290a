//! The worker contract: a script written for torchrun runs under `rtrain launch` unchanged,
//! sees the torchrun environment, and its ranks meet at MASTER_ADDR:MASTER_PORT.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn torchrun_script_gets_the_torchrun_environment() {
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/torchrun_env.py");
    let out_dir = dir.path().join("seen");
    std::fs::create_dir(&out_dir).unwrap();
    let text = format!(
        "[job]\nname = \"envcheck\"\nrun_dir = \"{}\"\nentrypoint = [\"python3\", \"{}\", \"{}\"]\n[train]\nworkers = 2\n",
        dir.path().display(),
        script.display(),
        out_dir.display()
    );
    let cfg = write_config(dir.path(), "job.toml", &text);
    let out = run(&["launch", cfg.to_str().unwrap()], Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));

    let mut ports = Vec::new();
    for rank in 0..2 {
        let text = std::fs::read_to_string(out_dir.join(format!("env-rank{rank}.json"))).unwrap();
        let seen: serde_json::Value = serde_json::from_str(&text).unwrap();
        let env = &seen["env"];
        let rank_s = rank.to_string();
        assert_eq!(env["RANK"], rank_s.as_str());
        assert_eq!(env["LOCAL_RANK"], rank_s.as_str());
        assert_eq!(env["ROLE_RANK"], rank_s.as_str());
        assert_eq!(env["WORLD_SIZE"], "2");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["ROLE_WORLD_SIZE"], "2");
        assert_eq!(env["GROUP_RANK"], "0");
        assert_eq!(env["NODE_RANK"], "0");
        assert_eq!(env["ROLE_NAME"], "trainer");
        assert_eq!(env["RTRAIN_ROLE"], "trainer");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "0");
        assert_eq!(env["RTRAIN_ATTEMPT"], "0");
        assert_eq!(env["TORCHELASTIC_RUN_ID"], "envcheck");
        assert!(env["RTRAIN_JOB_TOKEN"].as_str().is_some_and(|t| t.len() == 32));
        assert!(env["OMP_NUM_THREADS"].as_str().and_then(|t| t.parse::<u32>().ok()).is_some_and(|n| n >= 1));
        ports.push(env["MASTER_PORT"].clone());
        // The ranks really met: through torch.distributed when PyTorch is installed.
        let met = &seen["met"];
        match met["backend"].as_str() {
            Some("gloo") => assert_eq!(met["sum"], 3.0),
            Some("socket") => assert!(rank != 0 || met["peers"] == serde_json::json!([1])),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ports[0], ports[1], "one MASTER_PORT for the gang");
}
