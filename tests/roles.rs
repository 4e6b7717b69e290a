//! Jobs of several roles, with real processes: the roles demo (a Rust trainer gang fed by Python
//! actors that find it through the address book), each role its own fault domain under kill -9,
//! placement refused before anything starts, and no process left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

/// `cargo test` builds the examples next to the test binaries' folder.
fn example_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().unwrap();
    test_exe.parent().unwrap().parent().unwrap().join("examples").join(name)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the roles demo (the example binary is its own launcher) in `dir`, training "forever".
fn start_demo(dir: &Path, sets: &[&str]) -> Guard {
    let exe = example_binary("roles");
    assert!(exe.exists(), "{} not built", exe.display());
    let mut cmd = Command::new(&exe);
    cmd.current_dir(repo())
        .arg("configs/roles_demo.toml")
        .args(["--set", &format!("job.run_dir={}", dir.display()), "--set", "train.steps=1000000"])
        .args(["--set", "checkpoint.every=20", "--set", "roles.actor.backoff_s=0.05"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    Guard(Some(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()))
}

/// The training role's step lines of metrics.jsonl (its processes' own named metrics, which
/// carry a rank, are left out).
fn trainer_steps(run: &Path) -> Vec<serde_json::Value> {
    metrics(run).into_iter().filter(|m| m["role"] == "trainer" && m.get("rank").is_none()).collect()
}

fn last_trainer_step(run: &Path) -> u64 {
    trainer_steps(run).last().and_then(|m| m["step"].as_u64()).unwrap_or(0)
}

fn interrupt(guard: Guard, run: &Path) -> String {
    signal(guard.0.as_ref().unwrap().id(), libc::SIGINT);
    let out = wait_output(guard, LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(processes_with_env(&run_env(run)).is_empty(), "processes left behind after Ctrl-C");
    err
}

#[test]
fn killing_an_actor_restarts_it_alone_and_the_trainer_never_notices() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("roles_demo");
    let guard = start_demo(dir.path(), &[]);
    assert!(wait_until(LIMIT, || last_trainer_step(&run) >= 5), "the trainer never trained on the actors' data");
    let trainer_pids = (pid_of(&run, "trainer", 0), pid_of(&run, "trainer", 1));

    for kill in 0..5 {
        let rank = kill % 2;
        let victim = pid_of(&run, "actor", rank).expect("actor running");
        signal(victim, libc::SIGKILL);
        let replaced = wait_until(LIMIT, || pid_of(&run, "actor", rank).is_some_and(|p| p != victim));
        assert!(replaced, "actor:{rank} was not restarted after kill {kill}");
        // The restarted actor feeds the trainer again: steps keep coming.
        let before = last_trainer_step(&run);
        assert!(wait_until(LIMIT, || last_trainer_step(&run) > before + 3), "training stalled after kill {kill}");
    }
    assert_eq!((pid_of(&run, "trainer", 0), pid_of(&run, "trainer", 1)), trainer_pids, "the trainer was restarted");
    interrupt(guard, &run);

    let steps = trainer_steps(&run);
    assert!(steps.iter().all(|m| m["attempt"] == 0), "the trainer's attempt changed");
    let loss = |m: &serde_json::Value| m["loss"].as_f64().unwrap();
    let (first, last) = (loss(&steps[0]), loss(steps.last().unwrap()));
    assert!(last < 0.1 * first, "the trainer learned from the actors' samples: {first} -> {last}");
    let s = summary(&run);
    assert_eq!(s["status"], "interrupted");
    assert_eq!(s["restarts"], 0);
    let actor = &s["roles"]["actor"];
    assert_eq!(actor["size"], 2);
    assert_eq!(actor["restarts"], 5, "{s}");
    let attempts = actor["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 5);
    for a in attempts {
        assert!(a["cause"].as_str().unwrap().contains("was killed by signal 9 (SIGKILL)"), "{a}");
        assert!(a["rank"].as_u64().is_some() && a["recovery_s"].as_f64().is_some(), "{a}");
    }
    assert_eq!(s["roles"]["trainer"]["restarts"], 0);
    // The actors' own metrics reached metrics.jsonl under their role.
    let lines = metrics(&run);
    let named = |role: &str, metric: &str| {
        lines.iter().any(|m| m["role"] == role && m[metric].as_f64().is_some_and(|v| v > 0.0))
    };
    assert!(named("actor", "samples_per_s"), "no actor metrics");
    assert!(named("trainer", "samples_received"), "no metrics of the trainer's own");
}

#[test]
fn a_stopped_actor_is_detected_as_hung_and_restarted_alone() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("roles_demo");
    let guard = start_demo(dir.path(), &["fault.heartbeat_timeout_s=2", "rendezvous.heartbeat_s=0.5"]);
    assert!(wait_until(LIMIT, || last_trainer_step(&run) >= 5), "the trainer never trained on the actors' data");
    let victim = pid_of(&run, "actor", 1).expect("actor:1");
    signal(victim, libc::SIGSTOP);
    let replaced = wait_until(LIMIT, || pid_of(&run, "actor", 1).is_some_and(|p| p != victim));
    assert!(replaced, "the stopped actor was not replaced");
    interrupt(guard, &run);
    let s = summary(&run);
    let cause = s["roles"]["actor"]["attempts"][0]["cause"].as_str().unwrap_or_default().to_string();
    assert!(cause.starts_with("actor:1 stopped responding: no heartbeat for"), "{s}");
    assert!(trainer_steps(&run).iter().all(|m| m["attempt"] == 0), "the trainer's attempt changed");
}

#[test]
fn killing_a_trainer_rank_restarts_the_gang_while_the_actors_keep_running_and_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("roles_demo");
    let guard = start_demo(dir.path(), &[]);
    assert!(wait_until(LIMIT, || last_trainer_step(&run) >= 25), "the trainer never reached its first checkpoint");
    let actors = (pid_of(&run, "actor", 0), pid_of(&run, "actor", 1));
    assert!(actors.0.is_some() && actors.1.is_some());

    signal(pid_of(&run, "trainer", 1).expect("trainer:1"), libc::SIGKILL);
    let back = wait_until(LIMIT, || {
        trainer_steps(&run).last().is_some_and(|m| m["attempt"] == 1 && m["step"].as_u64() > Some(25))
    });
    assert!(back, "the trainer gang did not come back and train on");
    assert_eq!((pid_of(&run, "actor", 0), pid_of(&run, "actor", 1)), actors, "an actor was restarted");
    // Every actor was told, through its command stream, that the gang came back.
    for rank in 0..2 {
        let log = run.join(format!("logs/actor/actor-{rank}.log"));
        let told = wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("event ") && l.contains("\"restarted\"") && l.contains("\"role\":\"trainer\""))
        });
        assert!(told, "actor:{rank} was not told:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    interrupt(guard, &run);
    let s = summary(&run);
    let attempts = s["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{s}");
    assert!(attempts[1]["resumed_from_step"].as_u64().is_some_and(|step| step >= 20), "{s}");
    assert_eq!(s["roles"]["trainer"]["restarts"], 1);
    assert_eq!(s["roles"]["actor"]["restarts"], 0);
}

#[test]
fn a_role_that_cannot_be_placed_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let exe = example_binary("roles");
    let out = Command::new(&exe)
        .current_dir(repo())
        .arg("configs/roles_demo.toml")
        .args(["--set", &format!("job.run_dir={}", dir.path().display()), "--set", "roles.actor.size=500"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot place the job: role actor needs 125 CPU cores"), "{err}");
    assert!(err.contains("roles.actor.size") && err.contains("roles.actor.cpus_per_worker"), "{err}");
    assert!(!dir.path().join("roles_demo").exists(), "nothing may start or be written");
}

/// A job of shell roles only (no trainer), in `dir`.
fn roles_only(dir: &Path, roles: &str) -> PathBuf {
    let text = format!("[job]\nname = \"svc\"\nrun_dir = \"{}\"\n{roles}", dir.display());
    write_config(dir, "job.toml", &text)
}

/// A light role's command: `sh -c SCRIPT` on a quarter of a core.
fn sh(script: &str) -> String {
    format!("cpus_per_worker = 0.25\nentrypoint = [\"sh\", \"-c\", {}]", serde_json::to_string(script).unwrap())
}

#[test]
fn a_job_of_roles_only_ends_when_every_process_exits_and_restarts_alone_or_as_a_gang() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let m = marks.display();
    // `once`: each rank fails on its first run. `pair`: rank 1 fails on its first run, which
    // restarts the whole gang role, rank 0 included (it counts its own runs).
    let roles = format!(
        "[roles.once]\nsize = 2\nbackoff_s = 0.05\n{}\n\
         [roles.pair]\nsize = 2\nrestart = \"gang\"\nbackoff_s = 0.05\n{}\n",
        sh(&format!("f={m}/once-$ROLE_RANK; if [ ! -e $f ]; then touch $f; exit 3; fi; exit 0")),
        sh(&format!(
            "echo run >> {m}/pair-$ROLE_RANK.runs; \
             if [ $ROLE_RANK = 1 ] && [ ! -e {m}/pair ]; then touch {m}/pair; exit 4; fi; sleep 0.5"
        )),
    );
    let cfg = roles_only(dir.path(), &roles);
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let s = summary(&dir.path().join("svc"));
    assert_eq!(s["status"], "finished");
    assert_eq!(s["roles"]["once"]["restarts"], 2, "{s}");
    assert_eq!(s["roles"]["pair"]["restarts"], 1, "{s}");
    assert!(s["roles"]["pair"]["attempts"][0]["rank"].is_null(), "a gang restart names no single rank: {s}");
    let runs = |rank| std::fs::read_to_string(marks.join(format!("pair-{rank}.runs"))).unwrap().lines().count();
    assert_eq!((runs(0), runs(1)), (2, 2), "the whole gang role ran twice");
    assert!(err.contains("once:0 exited with exit code 3; restarting once:0"), "{err}");
}

#[test]
fn a_role_out_of_restarts_ends_the_job_naming_role_and_rank() {
    let dir = tempfile::tempdir().unwrap();
    let roles = format!(
        "[roles.ok]\nsize = 1\n{}\n[roles.bad]\nsize = 2\nmax_restarts = 1\nbackoff_s = 0\n{}\n",
        sh("sleep 300"),
        sh("echo \"bad $ROLE_RANK giving up\"; [ $ROLE_RANK = 0 ] && exec sleep 300; exit 9"),
    );
    let cfg = roles_only(dir.path(), &roles);
    let out = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("root cause: bad:1 exited with exit code 9"), "{err}");
    assert!(err.contains("no restart left: 1 of roles.bad.max_restarts = 1 used"), "{err}");
    assert!(err.contains("bad 1 giving up"), "the log's tail is shown: {err}");
    assert!(processes_with_env(&run_env(&dir.path().join("svc"))).is_empty(), "processes left behind");
    assert_eq!(summary(&dir.path().join("svc"))["status"], "failed");
}
