//! Looking at runs from another terminal: `rtrain runs`, `rtrain status RUN`, `rtrain logs RUN`
//! and `rtrain stop RUN`. A live run is one whose launch holds its lock (`launch.lock`); what it
//! is doing comes from the `status.json` it rewrites every second, how it ended from its
//! `summary.json`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::TRAINING_ROLE;
use crate::launch::status::STATUS_FILE;
use crate::run_lock;

fn read_json(path: &Path) -> Option<Value> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn is_run(dir: &Path) -> bool {
    dir.join("config.toml").is_file()
}

fn check_run(run: &Path) -> Result<(), String> {
    if is_run(run) {
        Ok(())
    } else {
        Err(format!(
            "{} is not a run directory (no config.toml); runs are <job.run_dir>/<job.name>, see `rtrain runs`",
            run.display()
        ))
    }
}

fn finish(result: Result<ExitCode, String>) -> ExitCode {
    result.unwrap_or_else(|message| {
        eprintln!("error: {message}");
        ExitCode::from(crate::cli::EXIT_FAILED)
    })
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// A duration for people: `42 s`, `3 min 05 s`, `2 h 07 min`.
fn human_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// The state of a run in one word, and the status or summary it comes from.
fn state_of(run: &Path) -> (String, Option<Value>) {
    let status = read_json(&run.join(STATUS_FILE));
    let summary = read_json(&run.join("summary.json"));
    if let Some(pid) = run_lock::holder(run) {
        return (format!("running (rtrain pid {pid})"), status);
    }
    if let Some(s) = summary {
        let state = s.get("status").and_then(Value::as_str).unwrap_or("ended").to_string();
        return (state, Some(s));
    }
    match status {
        Some(s) => ("ended without a summary (the launch was killed?)".into(), Some(s)),
        None => ("never started".into(), None),
    }
}

/// `rtrain runs [DIR]`: every run under a run directory, newest first.
pub fn runs_command(dir: &Path) -> ExitCode {
    finish((|| {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let mut runs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_run(p))
            .map(|p| {
                (
                    std::fs::metadata(p.join("config.toml"))
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH),
                    p,
                )
            })
            .collect();
        if runs.is_empty() {
            println!("no runs under {}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        runs.sort_by_key(|r| std::cmp::Reverse(r.0));
        println!("{:<28} {:<34} {:>13}", "run", "state", "step");
        for (_, run) in runs {
            let (state, doc) = state_of(&run);
            let step = doc.as_ref().and_then(|d| d.get("step").or(d.get("final_step"))).and_then(Value::as_u64);
            let total = doc.as_ref().and_then(|d| d.get("total_steps")).and_then(Value::as_u64);
            let step = match (step, total) {
                (Some(s), Some(t)) => format!("{s}/{t}"),
                (Some(s), None) => s.to_string(),
                _ => "-".into(),
            };
            let name = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            println!("{name:<28} {state:<34} {step:>13}");
        }
        Ok(ExitCode::SUCCESS)
    })())
}

/// `rtrain status RUN`: a live run's roles, processes, progress and attempts, or how it ended.
pub fn status_command(run: &Path, json: bool) -> ExitCode {
    finish((|| {
        check_run(run)?;
        let (state, doc) = state_of(run);
        if json {
            let mut out = doc.unwrap_or(Value::Null);
            if let Some(obj) = out.as_object_mut() {
                obj.insert("run_state".into(), state.clone().into());
            }
            println!("{out}");
            return Ok(ExitCode::SUCCESS);
        }
        let name = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(doc) = doc else {
            println!("{name}: {state}");
            return Ok(ExitCode::SUCCESS);
        };
        if doc.get("driver_pid").is_some() {
            print_live(&name, &state, &doc);
        } else {
            print_summary(&name, &doc);
        }
        Ok(ExitCode::SUCCESS)
    })())
}

fn print_live(name: &str, state: &str, s: &Value) {
    let mut line = format!("{name}: {state}");
    if let Some(attempt) = s.get("attempt").and_then(Value::as_u64) {
        line += &format!(", attempt {attempt} ({} restarts)", s.get("restarts").and_then(Value::as_u64).unwrap_or(0));
    }
    if let (Some(step), Some(total)) =
        (s.get("step").and_then(Value::as_u64), s.get("total_steps").and_then(Value::as_u64))
    {
        line += &format!(", step {step}/{total}");
    }
    if let Some(loss) = opt_f64(s, "loss") {
        line += &format!(", loss {loss:.4}");
    }
    if let Some(r) = opt_f64(s, "steps_per_s") {
        line += &format!(", {r:.2} steps/s");
    }
    if let Some(t) = opt_f64(s, "tokens_per_s") {
        line += &format!(", {t:.0} tokens/s");
    }
    if let Some(eta) = opt_f64(s, "eta_s") {
        line += &format!(", ETA {}", human_duration(eta));
    }
    if let Some(at) = opt_f64(s, "updated_unix") {
        line += &format!(" (as of {} ago)", human_duration(crate::contract::unix_now() - at));
    }
    println!("{line}");
    for (role, r) in s.get("roles").and_then(Value::as_object).into_iter().flatten() {
        println!("  {role}:");
        for rank in r.get("ranks").and_then(Value::as_array).into_iter().flatten() {
            let pid = rank.get("pid").and_then(Value::as_i64).map_or("-".into(), |p| p.to_string());
            let beat = opt_f64(rank, "heartbeat_age_s")
                .map_or("no heartbeat yet".into(), |a| format!("heartbeat {a:.1} s ago"));
            let step = rank.get("step").and_then(Value::as_u64).map_or(String::new(), |st| format!(", step {st}"));
            let host = rank.get("host").and_then(Value::as_str).map_or(String::new(), |h| format!(" on {h}"));
            println!(
                "    rank {:<4} pid {pid:<8} {:<12} {beat}{step}{host}",
                rank.get("rank").and_then(Value::as_u64).unwrap_or(0),
                rank.get("state").and_then(Value::as_str).unwrap_or("?"),
            );
        }
    }
    print_attempts(s);
    if let Some(url) = s.get("dashboard").and_then(Value::as_str) {
        println!("  dashboard: {url} (its token is in the URL the launch printed)");
    }
}

fn print_summary(name: &str, s: &Value) {
    let status = s.get("status").and_then(Value::as_str).unwrap_or("ended");
    let mut line = format!("{name}: {status} at step {}", s.get("final_step").and_then(Value::as_u64).unwrap_or(0));
    if let Some(loss) = opt_f64(s, "final_loss") {
        line += &format!(", loss {loss:.4}");
    }
    if let Some(t) = opt_f64(s, "tokens_per_s") {
        line += &format!(", {t:.0} tokens/s");
    }
    if let Some(w) = opt_f64(s, "wall_time_s") {
        line += &format!(", in {}", human_duration(w));
    }
    line += &format!(", {} restarts", s.get("restarts").and_then(Value::as_u64).unwrap_or(0));
    println!("{line}");
    for (role, r) in s.get("roles").and_then(Value::as_object).into_iter().flatten() {
        println!(
            "  {role}: {} processes, {} restarts",
            r.get("size").and_then(Value::as_u64).unwrap_or(0),
            r.get("restarts").and_then(Value::as_u64).unwrap_or(0)
        );
    }
    print_attempts(s);
    if let Some(f) = s.get("failure").filter(|f| !f.is_null()) {
        println!("  failure: {}", f.get("cause").and_then(Value::as_str).unwrap_or(&f.to_string()));
    }
}

fn print_attempts(s: &Value) {
    let attempts: Vec<&Value> = s.get("attempts").and_then(Value::as_array).into_iter().flatten().collect();
    if attempts.iter().all(|a| a.get("cause").is_none_or(Value::is_null)) {
        return;
    }
    println!("  attempts:");
    for a in attempts {
        let cause = a.get("cause").and_then(Value::as_str).unwrap_or("(running or finished)");
        let resumed =
            a.get("resumed_from_step").and_then(Value::as_u64).map_or(String::new(), |st| format!(" [from step {st}]"));
        println!("    {}{resumed}: {cause}", a.get("number").and_then(Value::as_u64).unwrap_or(0));
    }
}

/// The log of `role`:`rank`: the training role's of its latest attempt, a side role's one file.
pub(crate) fn log_path(run: &Path, role: &str, rank: usize) -> Result<PathBuf, String> {
    // Role names are letters, digits, `-` and `_` (the config refuses others): nothing else may
    // reach the path, which would then lead out of the run directory.
    if role.is_empty() || !role.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
        return Err(format!("`{role}` is not a role name (letters, digits, `-`, `_`): see --role"));
    }
    let logs = run.join("logs");
    let path = if role == TRAINING_ROLE {
        let latest = std::fs::read_dir(&logs)
            .map_err(|e| format!("no logs in {}: {e}", logs.display()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("attempt-")?.parse::<u32>().ok())
            .max()
            .ok_or_else(|| format!("no attempt has started in {}", run.display()))?;
        logs.join(format!("attempt-{latest}")).join(format!("{role}-{rank}.log"))
    } else {
        logs.join(role).join(format!("{role}-{rank}.log"))
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} does not exist: is there a role `{role}` with a rank {rank}? (--role, --rank)", path.display()))
    }
}

/// `rtrain logs RUN [--role R] [--rank N] [--follow]`.
pub fn logs_command(run: &Path, role: &str, rank: usize, follow: bool) -> ExitCode {
    finish((|| {
        check_run(run)?;
        // A launch that is starting may not have made its logs yet: a follower waits for them.
        let started = Instant::now();
        let mut path = loop {
            match log_path(run, role, rank) {
                Ok(p) => break p,
                Err(e)
                    if !follow || run_lock::holder(run).is_none() || started.elapsed() > Duration::from_secs(600) =>
                {
                    return Err(e);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut out = std::io::stdout().lock();
        let mut buf = Vec::new();
        let mut quiet_since: Option<Instant> = None;
        loop {
            buf.clear();
            file.read_to_end(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
            if !buf.is_empty() {
                // A reader that went away (`| head`) ends the command quietly.
                if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
                quiet_since = None;
            }
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            // A restarted gang logs into its new attempt's folder: follow it there.
            if let Ok(newer) = log_path(run, role, rank)
                && newer != path
            {
                let _ = writeln!(out, "== {}", newer.display());
                path = newer;
                file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
                continue;
            }
            if run_lock::holder(run).is_none() {
                // The launch is over: stop once nothing more arrives.
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })())
}

/// `rtrain stop RUN`: SIGTERM to the run's launch, which has its workers save a checkpoint and
/// exit (see `fault.stop_grace_s`) and records the run as interrupted; waits until it has.
pub fn stop_command(run: &Path, timeout: Duration) -> ExitCode {
    finish((|| {
        check_run(run)?;
        let Some(pid) = run_lock::holder(run) else {
            println!("{} is not running", run.display());
            return Ok(ExitCode::SUCCESS);
        };
        // SAFETY: a plain kill(2) to the process holding the run's lock.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(format!("cannot signal rtrain pid {pid}: {}", std::io::Error::last_os_error()));
        }
        let started = Instant::now();
        while run_lock::holder(run).is_some() {
            if started.elapsed() > timeout {
                return Err(format!("rtrain pid {pid} has not stopped after {} s", timeout.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (state, _) = state_of(run);
        println!(
            "{}: stopped ({state}); `rtrain launch` with its config resumes it from its last checkpoint",
            run.display()
        );
        Ok(ExitCode::SUCCESS)
    })())
}

/// `rtrain dashboard RUN [--port P]`: serves the run's dashboard with a token of its own until
/// Ctrl-C.
pub fn dashboard_command(run: &Path, port: u16) -> ExitCode {
    finish((|| {
        check_run(run)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        runtime.block_on(async {
            let dashboard = crate::dashboard::Dashboard::start(run.to_path_buf(), crate::worker_env::job_token(), port)
                .await
                .map_err(|e| format!("cannot serve on 127.0.0.1:{port}: {e} (--port 0 takes a free port)"))?;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "dashboard of {}: {}\n(Ctrl-C stops it)", run.display(), dashboard.url());
            tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        })
    })())
}
