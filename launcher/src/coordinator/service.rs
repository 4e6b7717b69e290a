//! The coordinator's gRPC service and the driver's handle on it. Both the gRPC service and the
//! HTTP/JSON endpoint ([`super::http`]) act on one [`Shared`] state.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::book::{JobBook, Refusal, Registered};
use crate::agent::ExitKind;
use crate::hosts::{HostInfo, Hosts};
use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::{
    Ack, AgentCommand, AgentEvent, BroadcastRequest, Command, FailureReport, HeartbeatRequest, LookupReply,
    LookupRequest, MetricsReport, PublishRequest, RegisterReply, RegisterRequest, StepMetrics, TOKEN_HEADER, WorkerId,
    WorkingDirChunk, WorkingDirRequest, agent_event,
};
use crate::working_dir::Bundle;

/// What the coordinator tells the driver.
#[derive(Debug, Clone)]
pub enum CoordinatorEvent {
    Registered {
        role: String,
        rank: u32,
    },
    /// Every rank of a gang role's attempt has registered.
    GangComplete {
        role: String,
    },
    Step(StepMetrics),
    Metrics(MetricsReport),
    Failure(FailureReport),
}

/// A command on its way to the processes of one role (or one rank of it).
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    pub(crate) to_role: String,
    pub(crate) to_rank: Option<u32>,
    pub(crate) command: Command,
}

/// Commands kept for subscribers that fall behind; older ones are dropped for them.
const COMMAND_BACKLOG: usize = 1024;

/// The state both front ends (gRPC, HTTP) act on.
pub(crate) struct Shared {
    pub(crate) book: Mutex<JobBook>,
    pub(crate) events: mpsc::UnboundedSender<CoordinatorEvent>,
    pub(crate) commands: broadcast::Sender<Routed>,
    seq: AtomicU64,
    /// The role whose rank 0 reports training steps; no other process may.
    training_role: Option<String>,
    /// Last (attempt, step) written: step reports must move forward within an attempt.
    last_step: Mutex<Option<(u32, u64)>>,
    pub(crate) token: String,
    /// The other hosts' agents.
    hosts: Arc<Hosts>,
    /// The working directory they fetch.
    working_dir: Option<Bundle>,
}

impl Shared {
    pub(crate) fn book(&self) -> std::sync::MutexGuard<'_, JobBook> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn admit(&self, id: Option<&WorkerId>) -> Result<WorkerId, Status> {
        let id = id.ok_or_else(|| Status::invalid_argument("worker id missing"))?;
        self.book().admit(id).map_err(refused)?;
        Ok(id.clone())
    }

    /// Queues a command for `to_role` (every rank, or `to_rank`).
    pub(crate) fn send(&self, to_role: &str, to_rank: Option<u32>, kind: &str, payload: &str, from_role: &str) {
        let command = Command {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            kind: kind.to_string(),
            payload: payload.to_string(),
            from_role: from_role.to_string(),
        };
        // No subscriber is not an error: nobody is listening yet.
        let _ = self.commands.send(Routed { to_role: to_role.to_string(), to_rank, command });
    }

    /// Commands for `id` from now on.
    pub(crate) fn subscribe(&self, id: &WorkerId) -> mpsc::Receiver<Command> {
        let mut rx = self.commands.subscribe();
        let (tx, out) = mpsc::channel(64);
        let (role, rank) = (id.role.clone(), id.rank);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(r) if r.to_role == role && r.to_rank.is_none_or(|k| k == rank) => {
                        if tx.send(r.command).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        out
    }

    pub(crate) fn broadcast(&self, req: &BroadcastRequest) -> Result<(), Status> {
        let from = self.admit(req.id.as_ref())?;
        if self.book().size(&req.to_role).is_none() {
            return Err(refused(Refusal::UnknownRole(req.to_role.clone())));
        }
        if req.kind.is_empty() {
            return Err(Status::invalid_argument("an event needs a kind"));
        }
        self.send(&req.to_role, req.to_rank, &req.kind, &req.payload, &from.role);
        Ok(())
    }

    pub(crate) fn report_metrics(&self, report: MetricsReport) -> Result<(), Status> {
        self.admit(report.id.as_ref())?;
        if let Some((name, value)) = report.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Status::invalid_argument(format!("metric `{name}` is {value}, not a finite number")));
        }
        let _ = self.events.send(CoordinatorEvent::Metrics(report));
        Ok(())
    }

    pub(crate) fn publish(&self, req: &PublishRequest) -> Result<(), Status> {
        let id = req.id.as_ref().ok_or_else(|| Status::invalid_argument("worker id missing"))?;
        if req.name.is_empty() || req.addr.is_empty() {
            return Err(Status::invalid_argument("publish needs a name and an address"));
        }
        self.book().publish(id, &req.name, &req.addr).map_err(refused)
    }

    pub(crate) fn lookup(&self, role: &str) -> LookupReply {
        let (endpoints, version) = self.book().lookup(role);
        LookupReply { endpoints, version }
    }

    pub(crate) fn report_step(&self, metrics: StepMetrics) -> Result<(), Status> {
        let id = self.admit(metrics.id.as_ref())?;
        if self.training_role.as_deref() != Some(id.role.as_str()) || id.rank != 0 {
            return Err(Status::permission_denied("only rank 0 of the training role reports steps"));
        }
        let mut last = self.last_step.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((attempt, step)) = *last
            && attempt == id.attempt
            && metrics.step <= step
        {
            return Err(Status::invalid_argument(format!("step {} does not follow step {step}", metrics.step)));
        }
        *last = Some((id.attempt, metrics.step));
        let _ = self.events.send(CoordinatorEvent::Step(metrics));
        Ok(())
    }
}

pub(crate) fn refused(r: Refusal) -> Status {
    match r {
        Refusal::Stale { .. } => Status::failed_precondition(r.to_string()),
        Refusal::AlreadyRegistered { .. } => Status::already_exists(r.to_string()),
        Refusal::UnknownRole(_) | Refusal::OutOfRange { .. } => Status::invalid_argument(r.to_string()),
    }
}

/// The driver's handle on a running coordinator.
pub struct CoordinatorHandle {
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The HTTP/JSON address (the same calls for programs in any language).
    pub http_addr: SocketAddr,
    shared: Arc<Shared>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// Declares a role of the job: `gang` roles rendezvous as a whole.
    pub fn add_role(&self, role: &str, size: usize, gang: bool, attempt: u32) {
        self.shared.book().add_role(role, size, gang, attempt);
    }

    /// Opens the rendezvous of a new attempt of a gang role; older attempts are refused.
    pub fn begin_attempt(&self, role: &str, attempt: u32, size: usize) {
        self.shared.book().begin_attempt(role, attempt, size);
    }

    /// A rank of a role that restarts alone starts incarnation `attempt`.
    pub fn restart_rank(&self, role: &str, rank: u32, attempt: u32) {
        self.shared.book().restart_rank(role, rank, attempt);
    }

    /// Ranks of a role's current attempt that have not registered yet.
    pub fn missing_ranks(&self, role: &str) -> Vec<u32> {
        self.shared.book().missing_ranks(role)
    }

    /// Last heartbeat of each rank of a role: its age in seconds and the step it reported.
    pub fn heartbeats(&self, role: &str) -> std::collections::BTreeMap<u32, (f64, u64)> {
        self.shared.book().heartbeats(role)
    }

    /// Sends a command from the driver to every process of `role` (or one rank).
    pub fn send(&self, role: &str, rank: Option<u32>, kind: &str, payload: &str) {
        self.shared.send(role, rank, kind, payload, "");
    }

    pub fn shutdown(self) {
        for server in self.servers {
            server.abort();
        }
    }
}

/// The largest control-plane message either way: a 4096-rank peer list is about 100 KiB.
const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// How long an agent has to introduce itself once its session is open.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection whose peer stops answering pings this long is closed (an agent's host that
/// vanished without closing its connection is lost after this).
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// How a coordinator serves.
pub struct CoordinatorSetup {
    /// The gRPC service's address (port 0 picks a free port). The HTTP/JSON endpoint is always
    /// on loopback: it serves the processes of the driver's host.
    pub bind: SocketAddr,
    /// Every call must carry it.
    pub token: String,
    /// Step reports are accepted from rank 0 of this role only.
    pub training_role: Option<String>,
    /// Where agents of other hosts join.
    pub hosts: Arc<Hosts>,
    /// Serve gRPC over TLS with this identity (certificate chain and key, PEM).
    pub tls: Option<(String, String)>,
    /// The job's working directory, for the agents to fetch.
    pub working_dir: Option<Bundle>,
}

/// Starts a single-host coordinator on `bind` (plain gRPC; no agents).
pub async fn start_coordinator(
    bind: SocketAddr,
    token: String,
    training_role: Option<String>,
) -> std::io::Result<(CoordinatorHandle, mpsc::UnboundedReceiver<CoordinatorEvent>)> {
    let hosts = Arc::new(Hosts::new(1, None));
    serve_coordinator(CoordinatorSetup { bind, token, training_role, hosts, tls: None, working_dir: None }).await
}

/// Binds the coordinator's gRPC service and its HTTP/JSON endpoint and serves until shut down.
pub async fn serve_coordinator(
    setup: CoordinatorSetup,
) -> std::io::Result<(CoordinatorHandle, mpsc::UnboundedReceiver<CoordinatorEvent>)> {
    let CoordinatorSetup { bind, token, training_role, hosts, tls, working_dir } = setup;
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let http_listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let http_addr = http_listener.local_addr()?;
    let (events, events_rx) = mpsc::unbounded_channel();
    let (commands, _) = broadcast::channel(COMMAND_BACKLOG);
    let shared = Arc::new(Shared {
        book: Mutex::new(JobBook::default()),
        events,
        commands,
        seq: AtomicU64::new(0),
        training_role,
        last_step: Mutex::new(None),
        token: token.clone(),
        hosts,
        working_dir,
    });
    let service = CoordinatorService { shared: shared.clone() };
    let check_token = move |req: Request<()>| -> Result<Request<()>, Status> {
        match req.metadata().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
            Some(t) if super::http::same_token(t, &token) => Ok(req),
            _ => {
                super::http::note_refusal("gRPC", req.remote_addr());
                Err(Status::unauthenticated("missing or wrong job token"))
            }
        }
    };
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(2 * KEEPALIVE));
    if let Some((cert, key)) = tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            // A peer that does not finish its handshake does not keep its connection.
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity).timeout(HELLO_TIMEOUT))
            .map_err(|e| std::io::Error::other(format!("TLS: {e}")))?;
    }
    let grpc = tokio::spawn(async move {
        let server = CoordinatorServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let result = builder
            .add_service(tonic::service::interceptor::InterceptedService::new(server, check_token))
            // Without TCP_NODELAY a reply's last frames wait for the client's delayed ACK (~40 ms).
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "coordinator stopped");
        }
    });
    let http = tokio::spawn(super::http::serve(http_listener, shared.clone()));
    Ok((CoordinatorHandle { addr, http_addr, shared, servers: vec![grpc, http] }, events_rx))
}

#[derive(Clone)]
struct CoordinatorService {
    shared: Arc<Shared>,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;
type AgentCommandStream = Pin<Box<dyn Stream<Item = Result<AgentCommand, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<WorkingDirChunk, Status>> + Send>>;

/// Bytes of the working directory's archive per message.
const CHUNK_BYTES: usize = 1 << 20;

/// The host an agent describes in its hello, checked.
fn host_info(hello: crate::proto::AgentHello) -> Result<HostInfo, Status> {
    let name_ok = !hello.name.is_empty()
        && hello.name.len() <= 255
        && hello.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !name_ok {
        return Err(Status::invalid_argument("an agent's name is 1 to 255 of A-Z a-z 0-9 - _ ."));
    }
    if hello.address.parse::<std::net::IpAddr>().is_err() {
        return Err(Status::invalid_argument(format!("`{}` is not an IP address", hello.address.escape_debug())));
    }
    if hello.cpus == 0 || hello.devices.len() > 4096 {
        return Err(Status::invalid_argument("an agent reports at least one CPU and at most 4096 GPUs"));
    }
    Ok(HostInfo { name: hello.name, address: hello.address, cpus: hello.cpus as usize, devices: hello.devices })
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        let req = request.into_inner();
        let id = req.id.ok_or_else(|| Status::invalid_argument("worker id missing"))?;
        let registered = self.shared.book().register(&id, &req.collective_addr).map_err(refused)?;
        let _ = self.shared.events.send(CoordinatorEvent::Registered { role: id.role.clone(), rank: id.rank });
        let peers = match registered {
            Registered::Alone(peers) => return Ok(Response::new(RegisterReply::new(peers))),
            Registered::Complete(peers) => {
                let _ = self.shared.events.send(CoordinatorEvent::GangComplete { role: id.role.clone() });
                peers
            }
            Registered::Wait(mut complete) => complete
                .wait_for(|p| p.is_some())
                .await
                .map_err(|_| Status::aborted("the attempt was replaced before the gang completed"))?
                .clone()
                .unwrap_or_default(),
        };
        Ok(Response::new(RegisterReply::shared(peers)))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        let id = req.id.ok_or_else(|| Status::invalid_argument("worker id missing"))?;
        self.shared.book().heartbeat(&id, req.step).map_err(refused)?;
        Ok(Response::new(Ack {}))
    }

    async fn heartbeats(&self, request: Request<Streaming<HeartbeatRequest>>) -> Result<Response<Ack>, Status> {
        let mut beats = request.into_inner();
        let Some(first) = beats.message().await? else { return Ok(Response::new(Ack {})) };
        let id = first.id.ok_or_else(|| Status::invalid_argument("the first heartbeat names no worker"))?;
        // The book's lock is taken once per stream; each beat then costs two atomic stores.
        let pulse = self.shared.book().pulse(&id).map_err(refused)?;
        let mut step = first.step;
        loop {
            if !pulse.beat(step) {
                // Retired since the stream opened: refused as a unary heartbeat would be.
                return Err(self
                    .shared
                    .book()
                    .admit(&id)
                    .err()
                    .map_or_else(|| Status::failed_precondition("this attempt was retired"), refused));
            }
            let Some(beat) = beats.message().await? else { return Ok(Response::new(Ack {})) };
            if beat.id.as_ref().is_some_and(|other| *other != id) {
                return Err(Status::invalid_argument("a heartbeat stream carries one worker's beats"));
            }
            step = beat.step;
        }
    }

    async fn report_step(&self, request: Request<StepMetrics>) -> Result<Response<Ack>, Status> {
        self.shared.report_step(request.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn report_metrics(&self, request: Request<MetricsReport>) -> Result<Response<Ack>, Status> {
        self.shared.report_metrics(request.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn report_failure(&self, request: Request<FailureReport>) -> Result<Response<Ack>, Status> {
        let report = request.into_inner();
        self.shared.admit(report.id.as_ref())?;
        let _ = self.shared.events.send(CoordinatorEvent::Failure(report));
        Ok(Response::new(Ack {}))
    }

    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<Ack>, Status> {
        self.shared.publish(&request.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn lookup(&self, request: Request<LookupRequest>) -> Result<Response<LookupReply>, Status> {
        Ok(Response::new(self.shared.lookup(&request.into_inner().role)))
    }

    type CommandsStream = CommandStream;

    async fn commands(&self, request: Request<WorkerId>) -> Result<Response<Self::CommandsStream>, Status> {
        let id = self.shared.admit(Some(&request.into_inner()))?;
        let rx = self.shared.subscribe(&id);
        let stream = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn broadcast(&self, request: Request<BroadcastRequest>) -> Result<Response<Ack>, Status> {
        self.shared.broadcast(&request.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    type WorkingDirStream = ChunkStream;

    async fn working_dir(
        &self,
        request: Request<WorkingDirRequest>,
    ) -> Result<Response<Self::WorkingDirStream>, Status> {
        let digest = request.into_inner().digest;
        let bundle = match &self.shared.working_dir {
            Some(b) if b.digest == digest => b.bytes.clone(),
            _ => return Err(Status::not_found(format!("this job ships no working directory {digest}"))),
        };
        let chunks = (0..bundle.len().div_ceil(CHUNK_BYTES).max(1)).map(move |i| {
            let data = bundle[i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(bundle.len())].to_vec();
            Ok(WorkingDirChunk { data })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    type AgentSessionStream = AgentCommandStream;

    async fn agent_session(
        &self,
        request: Request<Streaming<AgentEvent>>,
    ) -> Result<Response<Self::AgentSessionStream>, Status> {
        let from = request.remote_addr();
        let mut events = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, events.message()).await {
            Ok(Ok(Some(AgentEvent { event: Some(agent_event::Event::Hello(hello)) }))) => hello,
            _ => return Err(Status::invalid_argument("an agent's session begins with its hello")),
        };
        let info = host_info(hello)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let hosts = self.shared.hosts.clone();
        let host = hosts.join(info.clone(), commands).map_err(|e| {
            let from = from.map_or("an unknown address".to_string(), |a| a.to_string());
            tracing::warn!(agent = %info.name, %from, reason = %e, "agent refused");
            Status::failed_precondition(e.to_string())
        })?;
        tracing::info!(agent = %info.name, address = %info.address, cpus = info.cpus, "agent joined");
        tokio::spawn(async move {
            while let Ok(Some(event)) = events.message().await {
                if let Some(agent_event::Event::Exit(exit)) = event.event {
                    let kind = match (exit.code, exit.signal) {
                        (Some(code), _) => ExitKind::Code(code),
                        (None, Some(signal)) => ExitKind::Signal(signal),
                        (None, None) => ExitKind::Code(-1),
                    };
                    host.exited(exit.id, kind);
                }
            }
            if hosts.ending() {
                tracing::debug!(agent = %host.info.name, "agent's session ended with the job");
            } else {
                tracing::warn!(agent = %host.info.name, "agent's session ended: its processes are lost");
            }
            hosts.leave(&host);
        });
        let stream = tokio_stream::StreamExt::map(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}
