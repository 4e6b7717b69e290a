//! Shared helpers for the end-to-end tests: run `rtrain` as a real process with a deadline,
//! write configs into temporary run directories, read the run's outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const RTRAIN: &str = env!("CARGO_BIN_EXE_rtrain");

/// A tiny GPT job: fast enough for CI's two cores, big enough to exercise every part.
pub fn tiny_gpt(name: &str, run_dir: &Path, workers: u32, grad_accum: u32, steps: u32) -> String {
    format!(
        r#"
[job]
name = "{name}"
run_dir = "{run_dir}"
seed = 42

[train]
workers = {workers}
steps = {steps}
micro_batch = 4
grad_accum = {grad_accum}
lr = 3e-3
warmup_steps = 2
collective_timeout_s = 30

[model]
n_layer = 1
n_head = 2
n_embd = 32
n_ctx = 16

[data]
synthetic_bytes = 20000
"#,
        run_dir = run_dir.display()
    )
}

pub fn write_config(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Kills the child if the test fails before waiting on it.
pub struct Guard(pub Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A path inside the repository (where configs, examples and scripts are).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub fn spawn(args: &[&str]) -> Guard {
    spawn_in(Path::new("."), args)
}

/// `rtrain ARGS` started in the directory `cwd`.
pub fn spawn_in(cwd: &Path, args: &[&str]) -> Guard {
    let child = Command::new(RTRAIN)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rtrain");
    Guard(Some(child))
}

/// Starts `rtrain ARGS` with its stderr written to the file `log`, which the test may read while
/// it runs (a pipe is read only once the process exits, and would fill up before).
pub fn spawn_logged(args: &[&str], log: &Path) -> Guard {
    let child = Command::new(RTRAIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create the log"))
        .spawn()
        .expect("start rtrain");
    Guard(Some(child))
}

/// Waits for the child to exit within `limit`, else kills it and fails the test.
pub fn wait_output(mut guard: Guard, limit: Duration) -> Output {
    let mut child = guard.0.take().expect("child");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("rtrain did not exit within {limit:?}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(args: &[&str], limit: Duration) -> Output {
    wait_output(spawn(args), limit)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The lines of `<run>/metrics.jsonl` as JSON values.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect("metrics line is JSON")).collect()
}

pub fn summary(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary is JSON")
}

/// Processes (other than the caller) whose environment holds `needle`, e.g. the run's
/// config path: a worker of that run that is still alive.
pub fn processes_with_env(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        // Zombies keep no environ; a reaped-later zombie is not a live orphan.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.split_whitespace().nth(2) == Some("Z") {
            continue;
        }
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
            && env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Sends `sig` to `pid`, which the test started or found.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall on a pid this test started or found.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill({pid}, {sig})");
}

/// What every process of the run at `run` has in its environment (its config's path).
pub fn run_env(run: &Path) -> String {
    format!("RTRAIN_CONFIG={}", run.join("config.toml").display())
}

/// The live process of `role`:`rank` of the run at `run`.
pub fn pid_of(run: &Path, role: &str, rank: usize) -> Option<u32> {
    processes_with_env(&run_env(run)).into_iter().find(|pid| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let has = |kv: String| env.split(|b| *b == 0).any(|e| e == kv.as_bytes());
        has(format!("RTRAIN_ROLE={role}")) && has(format!("ROLE_RANK={rank}"))
    })
}
