//! `rtrain agent --join ADDR:PORT --token-file FILE`: the agent of a host besides the driver's,
//! like torchrun's elastic agent. It joins the job's coordinator (TLS, with the job token), says
//! what its host has, then starts and signals the processes the driver asks for and reports their
//! exits. It runs only what its own coordinator asks; when the session ends (the job finished, or
//! the driver is gone) it stops every process it started and exits.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::agent::{Agent, ExitKind, ProcId, WorkerLaunch};
use crate::cluster::{ClusterError, address_towards, ca_path, read_token};
use crate::job_client::endpoint;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{AgentCommand, AgentEvent, AgentHello, ProcessExit, TokenInterceptor, agent_command, agent_event};
use crate::scheduler::NodeResources;
use crate::worker_env::allowed_cpus;

/// How long the agent's processes get to exit after SIGTERM when the job ends.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Between tries to join a coordinator that is not up yet.
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq)]
pub struct AgentOptions {
    /// The coordinator, `host:port`.
    pub join: String,
    pub token_file: PathBuf,
    /// The job CA's certificate; by default beside the token file (`<token file>.ca.pem`).
    pub ca_file: Option<PathBuf>,
    /// This host's name in the job; by default the machine's host name.
    pub name: Option<String>,
    /// The address other hosts reach this one at; by default the one facing the coordinator.
    pub address: Option<IpAddr>,
    /// How long to keep trying to join (the driver may start after its agents).
    pub wait: Duration,
    /// Where shipped working directories are kept.
    pub cache_dir: PathBuf,
}

/// The agent's cache: `$RTRAIN_CACHE_DIR`, or `$XDG_CACHE_HOME/rtrain`, or `~/.cache/rtrain`.
pub fn default_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("RTRAIN_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("rtrain")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/rtrain")))
        .unwrap_or_else(|| std::env::temp_dir().join("rtrain-cache"))
}

/// The largest working directory an agent fetches (the driver refuses to ship more than
/// `cluster.max_working_dir_mb`).
const MAX_FETCH_BYTES: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--join {0}: expected HOST:PORT of the job's coordinator (its cluster.bind)")]
    Join(String),
    #[error(transparent)]
    Token(#[from] ClusterError),
    #[error("the coordinator at {addr} refused this agent: {message}")]
    Refused { addr: String, message: String },
    #[error("could not join the coordinator at {addr} within {wait:.0?}: {last}")]
    Unreachable { addr: String, wait: Duration, last: String },
    #[error("lost the coordinator at {addr}: {message} (the processes of this host were stopped)")]
    Lost { addr: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// Settings the user must change, as opposed to a job that went away.
    pub fn is_usage(&self) -> bool {
        matches!(self, AgentError::Join(_) | AgentError::Token(_) | AgentError::Refused { .. })
    }
}

/// What the agent needs to join, read afresh on every try (the driver may write them late).
struct Credentials {
    token: String,
    ca: String,
}

fn credentials(opts: &AgentOptions) -> Result<Result<Credentials, String>, AgentError> {
    let Some(token) = read_token(&opts.token_file)? else {
        return Ok(Err(format!("no token file {} yet", opts.token_file.display())));
    };
    let ca_file = opts.ca_file.clone().unwrap_or_else(|| ca_path(&opts.token_file));
    match std::fs::read_to_string(&ca_file) {
        Ok(ca) => Ok(Ok(Credentials { token, ca })),
        Err(e) => {
            Ok(Err(format!("cannot read the job's CA certificate {} ({e}); the driver writes it", ca_file.display())))
        }
    }
}

/// Joins the coordinator and serves it until the job ends.
pub async fn run_agent(opts: AgentOptions) -> Result<(), AgentError> {
    let port_ok =
        opts.join.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return Err(AgentError::Join(opts.join.clone()));
    }
    // Under Slurm, the node's name in the allocation (several may share one machine).
    let name = opts
        .name
        .clone()
        .or_else(|| std::env::var("SLURMD_NODENAME").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(crate::launch::status::host_name);
    let resources = NodeResources::local();
    let cpus = allowed_cpus().len().max(1).min(resources.cpus) as u32;
    let deadline = tokio::time::Instant::now() + opts.wait;
    let mut tries = 0u64;
    // The coordinator's name may not resolve yet (a pod's DNS record comes with its address):
    // resolving is part of what is retried.
    let (mut inbound, outbound, mut client, address) = loop {
        let last =
            match (credentials(&opts)?, tokio::net::lookup_host(&opts.join).await.ok().and_then(|mut a| a.next())) {
                (Err(why), _) => why,
                (_, None) => format!("cannot resolve {}", opts.join),
                (Ok(creds), Some(coordinator)) => {
                    let address = match opts.address {
                        Some(a) => a,
                        None => address_towards(coordinator)?,
                    };
                    let hello = AgentHello {
                        name: name.clone(),
                        address: address.to_string(),
                        cpus,
                        devices: NodeResources::local_devices(),
                    };
                    match open_session(&opts.join, &creds, hello).await {
                        Ok((inbound, outbound, client)) => break (inbound, outbound, client, address),
                        Err(status) if is_refusal(&status) => {
                            return Err(AgentError::Refused {
                                addr: opts.join.clone(),
                                message: status.message().to_string(),
                            });
                        }
                        Err(status) => status.message().to_string(),
                    }
                }
            };
        if tokio::time::Instant::now() + RETRY > deadline {
            return Err(AgentError::Unreachable { addr: opts.join.clone(), wait: opts.wait, last });
        }
        // Said once, then every half minute: the driver may simply not be up yet.
        if tries.is_multiple_of(60) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs();
            eprintln!("rtrain agent: waiting for the coordinator at {} ({last}); trying for {left} s more", opts.join);
        }
        tries += 1;
        tokio::time::sleep(RETRY).await;
    };
    eprintln!(
        "rtrain agent: joined {} as {name} ({address}, {cpus} CPUs, {} GPUs)",
        opts.join,
        NodeResources::local_devices().len()
    );

    let (mut agent, mut exits) = Agent::new();
    let mut copies = Copies::new(&opts.cache_dir);
    let mut ids: BTreeMap<ProcId, u64> = BTreeMap::new();
    let allowed = allowed_cpus();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let ended = loop {
        tokio::select! {
            command = inbound.message() => match command {
                Ok(Some(AgentCommand { command: Some(agent_command::Command::Spawn(spawn)) })) => {
                    let id = ProcId::new(&spawn.role, spawn.rank as usize);
                    let cwd = match working_dir(&mut client, &mut copies, &spawn).await {
                        Ok(cwd) => cwd,
                        Err(e) => {
                            note_in_log(Path::new(&spawn.log_path), &format!("rtrain agent on {name}: {e}"));
                            let _ = outbound.send(exit_event(spawn.id, ExitKind::Code(127)));
                            continue;
                        }
                    };
                    if ids.contains_key(&id) {
                        // A process of the same name from an earlier attempt goes first (its exit
                        // must not be taken for the new one's).
                        agent.kill(&id);
                        let deadline = tokio::time::Instant::now() + STOP_GRACE;
                        while let Ok(Some(exit)) = tokio::time::timeout_at(deadline, exits.recv()).await {
                            let old = exit.id == id;
                            report_exit(&mut agent, &mut ids, &outbound, exit);
                            if old {
                                break;
                            }
                        }
                    }
                    let cores: Option<Vec<usize>> =
                        spawn.cores.iter().map(|&c| allowed.get(c as usize).copied()).collect();
                    let launch = WorkerLaunch {
                        id: id.clone(),
                        command: spawn.command,
                        env: spawn.env.into_iter().collect(),
                        log_path: PathBuf::from(&spawn.log_path),
                        echo: None,
                        cpus: cores.unwrap_or_default(),
                        cwd,
                    };
                    if let Some(dir) = launch.log_path.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    ids.insert(id.clone(), spawn.id);
                    if let Err(e) = agent.spawn(launch.clone()) {
                        note_in_log(&launch.log_path, &format!("rtrain agent on {name}: {e}"));
                        ids.remove(&id);
                        let _ = outbound.send(exit_event(spawn.id, ExitKind::Code(127)));
                    }
                }
                Ok(Some(AgentCommand { command: Some(agent_command::Command::Signal(signal)) })) => {
                    if let Some((id, _)) = ids.iter().find(|(_, n)| **n == signal.id) {
                        agent.signal(id, signal.signal);
                    }
                }
                Ok(Some(AgentCommand { command: Some(agent_command::Command::End(end)) })) => {
                    eprintln!("rtrain agent: {}", end.reason);
                    break Ok(());
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(status) => break Err(AgentError::Lost { addr: opts.join.clone(), message: status.message().to_string() }),
            },
            Some(exit) = exits.recv() => report_exit(&mut agent, &mut ids, &outbound, exit),
            _ = sigterm.recv() => break Ok(()),
            _ = sigint.recv() => break Ok(()),
        }
    };
    let stopped = agent.live().len();
    agent.stop_all(STOP_GRACE, &mut exits).await;
    if stopped > 0 {
        eprintln!("rtrain agent: stopped {stopped} process(es) of this host");
    }
    ended
}

/// The coordinator answered: this agent is not welcome (a wrong token, a full job), as opposed to
/// a coordinator not up yet.
fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
    )
}

type Client =
    CoordinatorClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>>;
type Session = (tonic::Streaming<AgentCommand>, mpsc::UnboundedSender<AgentEvent>, Client);

/// This agent session's copies of shipped working directories, one per archive, under
/// `<cache>/sessions/`; removed when the session ends.
struct Copies {
    cache: PathBuf,
    session: PathBuf,
    made: std::collections::HashMap<String, PathBuf>,
}

impl Copies {
    fn new(cache: &Path) -> Self {
        let session =
            cache.join("sessions").join(format!("{}-{}", std::process::id(), crate::contract::unix_now() as u64));
        Self { cache: cache.to_path_buf(), session, made: std::collections::HashMap::new() }
    }
}

impl Drop for Copies {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.session);
    }
}

/// Where a process the driver asks for runs here: in this session's copy of the shipped working
/// directory (its archive fetched the first time this host sees it), or where it says when
/// nothing is shipped.
async fn working_dir(
    client: &mut Client,
    copies: &mut Copies,
    spawn: &crate::proto::SpawnProcess,
) -> Result<PathBuf, String> {
    let asked = PathBuf::from(&spawn.cwd);
    let digest = &spawn.working_dir_digest;
    let Ok(rel) = asked.strip_prefix(&spawn.working_dir_root) else { return Ok(asked) };
    if digest.is_empty() {
        return Ok(asked);
    }
    let valid = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        return Err(format!("the driver sent a malformed working directory digest {digest:?}"));
    }
    if let Some(copy) = copies.made.get(digest) {
        return Ok(copy.join(rel));
    }
    let bytes = match crate::working_dir::cached_archive(&copies.cache, digest) {
        Some(bytes) => bytes,
        None => {
            let request = crate::proto::WorkingDirRequest { digest: digest.clone() };
            let mut chunks = client
                .working_dir(request)
                .await
                .map_err(|s| format!("cannot fetch the working directory: {}", s.message()))?
                .into_inner();
            let mut bytes = Vec::new();
            loop {
                match chunks.message().await {
                    Ok(Some(chunk)) => {
                        bytes.extend_from_slice(&chunk.data);
                        if bytes.len() as u64 > MAX_FETCH_BYTES {
                            return Err(format!("the working directory is larger than {MAX_FETCH_BYTES} bytes"));
                        }
                    }
                    Ok(None) => break,
                    Err(s) => return Err(format!("fetching the working directory failed: {}", s.message())),
                }
            }
            crate::working_dir::store_archive(&copies.cache, digest, &bytes).map_err(|e| e.to_string())?;
            bytes
        }
    };
    let copy = copies.session.join(&digest[..16]);
    let target = copy.clone();
    let size = bytes.len();
    tokio::task::spawn_blocking(move || crate::working_dir::unpack_into(&bytes, &target))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    eprintln!("rtrain agent: the job's working directory ({size} bytes) is unpacked in {}", copy.display());
    copies.made.insert(digest.clone(), copy.clone());
    Ok(copy.join(rel))
}

async fn open_session(addr: &str, creds: &Credentials, hello: AgentHello) -> Result<Session, tonic::Status> {
    let channel = endpoint(addr, Some(&creds.ca))
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(error_chain(&e)))?;
    let interceptor =
        TokenInterceptor::new(&creds.token).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let mut client = CoordinatorClient::with_interceptor(channel, interceptor);
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(AgentEvent { event: Some(agent_event::Event::Hello(hello)) });
    let inbound = client.agent_session(UnboundedReceiverStream::new(rx)).await?.into_inner();
    Ok((inbound, tx, client))
}

/// An error with its causes, which say what failed (a refused connection, a certificate).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Some errors already include their cause's text.
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(&format!(": {said}"));
        }
        source = cause.source();
    }
    text
}

/// Reaps an exited process and tells the driver, under the id it gave the process.
fn report_exit(
    agent: &mut Agent,
    ids: &mut BTreeMap<ProcId, u64>,
    outbound: &mpsc::UnboundedSender<AgentEvent>,
    exit: crate::agent::WorkerExit,
) {
    agent.reaped(&exit.id);
    if let Some(n) = ids.remove(&exit.id) {
        let _ = outbound.send(exit_event(n, exit.kind));
    }
}

fn exit_event(id: u64, kind: ExitKind) -> AgentEvent {
    let (code, signal) = match kind {
        ExitKind::Code(code) => (Some(code), None),
        ExitKind::Signal(signal) => (None, Some(signal)),
        ExitKind::Lost => (Some(-1), None),
    };
    AgentEvent { event: Some(agent_event::Event::Exit(ProcessExit { id, code, signal })) }
}

/// Appends a line to a process's log (best effort: the log is where its failure is looked for).
fn note_in_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::File::options().create(true).append(true).open(path) {
        let _ = writeln!(file, "{line}");
    }
}
