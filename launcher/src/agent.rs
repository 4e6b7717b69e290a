//! The agent: spawns worker processes, watches them, signals them and reports their exits. Each
//! worker leads its own process group, so stopping it stops whatever it started, and it dies with
//! the process that started it (PR_SET_PDEATHSIG) even if that one is killed with SIGKILL. The
//! workers of other hosts are started by their host's agent (`rtrain agent`), through a
//! [`RemoteHost`]; they are supervised here the same way.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::hosts::RemoteHost;
use crate::progress::Printer;

/// How long the output of an ended worker may take to reach its log.
const ECHO_DRAIN: Duration = Duration::from_secs(2);

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
    /// Its host's agent went away (the host failed, or its network did): whatever became of
    /// the process, the job has lost it.
    Lost,
}

impl ExitKind {
    fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitKind::Code(code),
            (None, Some(sig)) => ExitKind::Signal(sig),
            (None, None) => ExitKind::Code(-1),
        }
    }

    pub fn success(self) -> bool {
        self == ExitKind::Code(0)
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(code) => write!(f, "exit code {code}"),
            ExitKind::Signal(sig) => write!(f, "signal {} ({})", sig, signal_name(*sig)),
            ExitKind::Lost => write!(f, "host lost"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

/// A process of the job: its role and its rank within the role.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcId {
    pub role: String,
    pub rank: usize,
}

impl ProcId {
    pub fn new(role: &str, rank: usize) -> Self {
        Self { role: role.to_string(), rank }
    }
}

impl std::fmt::Display for ProcId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.role, self.rank)
    }
}

/// One worker to start.
#[derive(Debug, Clone)]
pub struct WorkerLaunch {
    pub id: ProcId,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr both go here (appended to).
    pub log_path: PathBuf,
    /// Where the output's lines also go as they come, after a prefix (`trainer:0| `), if anywhere.
    pub echo: Option<(String, Printer)>,
    /// CPU cores the worker is pinned to; empty leaves it to the OS scheduler.
    pub cpus: Vec<usize>,
    /// The worker's working directory (`job.working_dir`).
    pub cwd: PathBuf,
}

/// A worker process ended.
#[derive(Debug, Clone)]
pub struct WorkerExit {
    pub id: ProcId,
    pub kind: ExitKind,
}

/// Where a live worker runs: on this host (its pid), or on another (its name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whereabouts {
    Here(i32),
    On(String),
}

/// A worker that has not been reaped.
enum Live {
    /// On this host: its process-group id.
    Local(i32),
    /// On another host: the agent there and its id for the process.
    Remote(Arc<RemoteHost>, u64),
}

impl Live {
    fn signal(&self, signal: i32) {
        match self {
            Live::Local(pgid) => signal_group(*pgid, signal),
            Live::Remote(host, id) => host.signal(*id, signal),
        }
    }
}

/// The processes an agent started, on this host or through the agents of others.
pub struct Agent {
    live: BTreeMap<ProcId, Live>,
    exits: mpsc::UnboundedSender<WorkerExit>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create the log file {}: {source}", path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("cannot start `{program}` for {id}: {source}")]
    Exec { program: String, id: ProcId, source: std::io::Error },
    #[error("{0}")]
    Program(String),
}

impl Agent {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<WorkerExit>) {
        let (exits, rx) = mpsc::unbounded_channel();
        (Self { live: BTreeMap::new(), exits }, rx)
    }

    /// Starts one worker; its exit arrives on the channel returned by [`Agent::new`].
    pub fn spawn(&mut self, launch: WorkerLaunch) -> Result<u32, SpawnError> {
        let log = log_file(&launch.log_path)?;
        let (program, args) = launch.command.split_first().ok_or_else(|| SpawnError::Exec {
            program: String::new(),
            id: launch.id.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        })?;
        let mut cmd = Command::new(program);
        let (out, err, echo_log) = match &launch.echo {
            Some(_) => (Stdio::piped(), Stdio::piped(), Some(log)),
            None => {
                let log_err =
                    log.try_clone().map_err(|source| SpawnError::Log { path: launch.log_path.clone(), source })?;
                (Stdio::from(log), Stdio::from(log_err), None)
            }
        };
        cmd.args(args)
            .current_dir(&launch.cwd)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: the CPU set is built before the fork; prctl and sched_setaffinity are
        // async-signal-safe syscalls, and nothing else runs between fork and exec.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for cpu in &launch.cpus {
                libc::CPU_SET(*cpu, &mut set);
            }
            let pin = !launch.cpus.is_empty();
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if pin && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| SpawnError::Exec {
            program: program.clone(),
            id: launch.id.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        self.live.insert(launch.id.clone(), Live::Local(pid as i32));
        let mut copies = Vec::new();
        if let (Some((prefix, printer)), Some(log)) = (launch.echo, echo_log) {
            let log = Arc::new(Mutex::new(log));
            let streams: [Option<Box<dyn AsyncRead + Send + Unpin>>; 2] = [
                child.stdout.take().map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
                child.stderr.take().map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
            ];
            for stream in streams.into_iter().flatten() {
                copies.push(tokio::spawn(echo_lines(stream, log.clone(), prefix.clone(), printer.clone())));
            }
        }
        let (exits, id) = (self.exits.clone(), launch.id);
        tokio::spawn(async move {
            let kind = match child.wait().await {
                Ok(status) => ExitKind::from_status(status),
                Err(_) => ExitKind::Code(-1),
            };
            // The last lines reach the log before the exit is handled (its tail goes into the
            // failure summary); a child of the worker that keeps the pipe open is not waited for.
            let _ = tokio::time::timeout(ECHO_DRAIN, futures_join(copies)).await;
            let _ = exits.send(WorkerExit { id, kind });
        });
        Ok(pid)
    }

    /// Starts one worker on another host, through its agent; its exit arrives on the same
    /// channel as the local ones' (as [`ExitKind::Lost`] if the host goes away first). The log
    /// path and working directory are the same paths there.
    pub fn spawn_on(&mut self, host: &Arc<RemoteHost>, launch: WorkerLaunch) {
        let id = host.spawn(&launch, self.exits.clone());
        self.live.insert(launch.id, Live::Remote(host.clone(), id));
    }

    /// Marks a worker reaped (call on each exit event before signalling others).
    pub fn reaped(&mut self, id: &ProcId) {
        if let Some(live) = self.live.remove(id) {
            // Whatever the worker left running in its group goes with it.
            live.signal(libc::SIGKILL);
        }
    }

    pub fn live(&self) -> Vec<ProcId> {
        self.live.keys().cloned().collect()
    }

    /// Every live worker of this host with its pid (the process group's id).
    pub fn pids(&self) -> Vec<(ProcId, i32)> {
        self.live
            .iter()
            .filter_map(|(id, live)| match live {
                Live::Local(pid) => Some((id.clone(), *pid)),
                Live::Remote(..) => None,
            })
            .collect()
    }

    /// Every live worker with its pid on this host, or the name of the host it runs on.
    pub fn whereabouts(&self) -> Vec<(ProcId, Whereabouts)> {
        self.live
            .iter()
            .map(|(id, live)| {
                let at = match live {
                    Live::Local(pid) => Whereabouts::Here(*pid),
                    Live::Remote(host, _) => Whereabouts::On(host.info.name.clone()),
                };
                (id.clone(), at)
            })
            .collect()
    }

    /// The pid of a live worker of this host.
    pub fn pid(&self, id: &ProcId) -> Option<i32> {
        match self.live.get(id)? {
            Live::Local(pid) => Some(*pid),
            Live::Remote(..) => None,
        }
    }

    /// SIGKILLs one worker's process group (a hung worker: SIGTERM would wait for nothing).
    pub fn kill(&self, id: &ProcId) {
        self.signal(id, libc::SIGKILL);
    }

    /// Sends `signal` to one live worker's process group.
    pub fn signal(&self, id: &ProcId, signal: i32) {
        if let Some(live) = self.live.get(id) {
            live.signal(signal);
        }
    }

    /// Sends `signal` to every live worker's process group.
    pub fn signal_all(&self, signal: i32) {
        for live in self.live.values() {
            live.signal(signal);
        }
    }

    /// Stops every live worker: SIGTERM, up to `grace` to exit, then SIGKILL. Exits seen while
    /// waiting are returned so the caller can still report them.
    pub async fn stop_all(
        &mut self,
        grace: Duration,
        exits: &mut mpsc::UnboundedReceiver<WorkerExit>,
    ) -> Vec<WorkerExit> {
        self.stop_all_with(libc::SIGTERM, grace, exits).await
    }

    /// Stops every live worker as [`Agent::stop_all`] does, with `first` instead of SIGTERM.
    pub async fn stop_all_with(
        &mut self,
        first: i32,
        grace: Duration,
        exits: &mut mpsc::UnboundedReceiver<WorkerExit>,
    ) -> Vec<WorkerExit> {
        let all = self.live();
        self.stop_with(&all, first, grace, exits).await
    }

    /// Stops the workers `ids` as [`Agent::stop_all`] does. Exits of other workers that arrive
    /// meanwhile are returned too (they are reaped like the rest).
    pub async fn stop(
        &mut self,
        ids: &[ProcId],
        grace: Duration,
        exits: &mut mpsc::UnboundedReceiver<WorkerExit>,
    ) -> Vec<WorkerExit> {
        self.stop_with(ids, libc::SIGTERM, grace, exits).await
    }

    /// Signals the workers `ids` with `first`, gives them up to `grace` to exit, then SIGKILLs
    /// the rest.
    async fn stop_with(
        &mut self,
        ids: &[ProcId],
        first: i32,
        grace: Duration,
        exits: &mut mpsc::UnboundedReceiver<WorkerExit>,
    ) -> Vec<WorkerExit> {
        let mut seen = Vec::new();
        let signal = |agent: &Self, sig| {
            for id in ids {
                agent.signal(id, sig);
            }
        };
        let pending = |agent: &Self| ids.iter().any(|id| agent.live.contains_key(id));
        if !pending(self) {
            return seen;
        }
        signal(self, first);
        // A stopped (SIGSTOP) worker acts on the signal only once continued.
        signal(self, libc::SIGCONT);
        let deadline = tokio::time::Instant::now() + grace;
        while pending(self) {
            match tokio::time::timeout_at(deadline, exits.recv()).await {
                Ok(Some(exit)) => {
                    self.reaped(&exit.id);
                    seen.push(exit);
                }
                Ok(None) | Err(_) => break,
            }
        }
        if pending(self) {
            signal(self, libc::SIGKILL);
            while pending(self) {
                match tokio::time::timeout(Duration::from_secs(5), exits.recv()).await {
                    Ok(Some(exit)) => {
                        self.reaped(&exit.id);
                        seen.push(exit);
                    }
                    _ => break,
                }
            }
        }
        seen
    }
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid > 0 {
        // SAFETY: plain syscall; ESRCH (group already gone) is fine.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &std::path::Path, lines: usize) -> Vec<String> {
    let Ok(text) = std::fs::read(path) else { return Vec::new() };
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|s| s.to_string()).collect()
}

/// Waits for every task of `tasks`.
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Opens a worker's log for appending.
fn log_file(path: &Path) -> Result<std::fs::File, SpawnError> {
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| SpawnError::Log { path: path.to_path_buf(), source })
}

/// The longest line shown on the terminal; longer output without a line end is shown in pieces.
const ECHO_LINE_MAX: usize = 64 << 10;

/// Copies a worker's output to its log as it comes and, line by line after `prefix`, to the
/// terminal: a line ends at `\n` or `\r` (progress bars redraw with `\r`), is cut at
/// [`ECHO_LINE_MAX`], and shows control characters escaped (a worker cannot drive the terminal).
async fn echo_lines(
    mut stream: Box<dyn AsyncRead + Send + Unpin>,
    log: Arc<Mutex<std::fs::File>>,
    prefix: String,
    printer: Printer,
) {
    let mut chunk = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let show = |line: &[u8]| {
        let text: String = String::from_utf8_lossy(line)
            .chars()
            .flat_map(|c| if c.is_control() && c != '\t' { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
            .collect();
        printer.println(&format!("{prefix}{text}"));
    };
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Best effort, as the worker's own writes to a full disk would be.
        let _ = log.lock().unwrap_or_else(|p| p.into_inner()).write_all(&chunk[..n]);
        for &byte in &chunk[..n] {
            if byte == b'\n' || byte == b'\r' {
                if !line.is_empty() {
                    show(&line);
                }
                line.clear();
            } else {
                line.push(byte);
                if line.len() >= ECHO_LINE_MAX {
                    show(&line);
                    line.clear();
                }
            }
        }
    }
    if !line.is_empty() {
        show(&line);
    }
}
