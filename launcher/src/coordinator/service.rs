use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::{
    Ack, FailureReport, HeartbeatRequest, RegisterReply, RegisterRequest, StepMetrics, TOKEN_HEADER, WorkerId,
};
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// What the coordinator tells the driver.
#[derive(Debug, Clone)]
pub enum CoordinatorEvent {
    Registered {
        rank: u32,
    },
    /// Every rank of the attempt has registered.
    GangComplete,
    Step(StepMetrics),
    Failure(FailureReport),
}

/// The gang being assembled: one per attempt.
struct Rendezvous {
    attempt: u32,
    world_size: usize,
    peers: BTreeMap<u32, String>,
    complete: watch::Sender<Option<Vec<String>>>,
}

struct State {
    rendezvous: Rendezvous,
    /// Last heartbeat per rank: when, and the step it reported.
    heartbeats: BTreeMap<u32, (Instant, u64)>,
}

#[derive(Clone)]
struct CoordinatorService {
    state: Arc<Mutex<State>>,
    events: mpsc::UnboundedSender<CoordinatorEvent>,
}

/// The driver's handle on a running coordinator.
pub struct CoordinatorHandle {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl CoordinatorHandle {
    /// Opens the rendezvous of a new attempt; registrations for older attempts are refused.
    pub fn begin_attempt(&self, attempt: u32, world_size: usize) {
        let mut state = lock(&self.state);
        let (complete, _) = watch::channel(None);
        state.rendezvous = Rendezvous { attempt, world_size, peers: BTreeMap::new(), complete };
        state.heartbeats.clear();
    }

    /// Ranks of the current attempt that have not registered yet.
    pub fn missing_ranks(&self) -> Vec<u32> {
        let state = lock(&self.state);
        let r = &state.rendezvous;
        (0..r.world_size as u32).filter(|rank| !r.peers.contains_key(rank)).collect()
    }

    /// Last heartbeat of each rank: its age in seconds and the step it reported.
    pub fn heartbeats(&self) -> BTreeMap<u32, (f64, u64)> {
        lock(&self.state)
            .heartbeats
            .iter()
            .map(|(rank, (at, step))| (*rank, (at.elapsed().as_secs_f64(), *step)))
            .collect()
    }

    pub fn shutdown(self) {
        self.server.abort();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Binds the coordinator on `bind` (port 0 picks a free port) and serves until shut down.
/// Every call must carry `token`.
pub async fn start_coordinator(
    bind: SocketAddr,
    token: String,
) -> std::io::Result<(CoordinatorHandle, mpsc::UnboundedReceiver<CoordinatorEvent>)> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let (events, events_rx) = mpsc::unbounded_channel();
    let (complete, _) = watch::channel(None);
    let state = Arc::new(Mutex::new(State {
        rendezvous: Rendezvous { attempt: 0, world_size: 0, peers: BTreeMap::new(), complete },
        heartbeats: BTreeMap::new(),
    }));
    let service = CoordinatorService { state: state.clone(), events };
    let check_token = move |req: Request<()>| -> Result<Request<()>, Status> {
        match req.metadata().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
            Some(t) if t == token => Ok(req),
            _ => Err(Status::unauthenticated("missing or wrong job token")),
        }
    };
    let server = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(CoordinatorServer::with_interceptor(service, check_token))
            // Without TCP_NODELAY a reply's last frames wait for the client's delayed ACK (~40 ms).
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "coordinator stopped");
        }
    });
    Ok((CoordinatorHandle { addr, state, server }, events_rx))
}

impl CoordinatorService {
    /// Checks that `id` belongs to the current attempt's trainer gang.
    fn admit(&self, id: Option<&WorkerId>) -> Result<WorkerId, Status> {
        let id = id.ok_or_else(|| Status::invalid_argument("worker id missing"))?;
        let state = lock(&self.state);
        let r = &state.rendezvous;
        if id.attempt != r.attempt {
            return Err(Status::failed_precondition(format!(
                "attempt {} is stale; the current attempt is {}",
                id.attempt, r.attempt
            )));
        }
        if id.role != "trainer" {
            return Err(Status::invalid_argument(format!("unknown role `{}`", id.role)));
        }
        if id.rank as usize >= r.world_size {
            return Err(Status::invalid_argument(format!("rank {} is outside the gang of {}", id.rank, r.world_size)));
        }
        Ok(id.clone())
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        let req = request.into_inner();
        let id = self.admit(req.id.as_ref())?;
        let mut complete = {
            let mut state = lock(&self.state);
            let r = &mut state.rendezvous;
            if r.peers.contains_key(&id.rank) {
                return Err(Status::already_exists(format!("rank {} already registered", id.rank)));
            }
            r.peers.insert(id.rank, req.collective_addr);
            let _ = self.events.send(CoordinatorEvent::Registered { rank: id.rank });
            if r.peers.len() == r.world_size {
                let peers: Vec<String> = r.peers.values().cloned().collect();
                r.complete.send_replace(Some(peers));
                let _ = self.events.send(CoordinatorEvent::GangComplete);
            }
            r.complete.subscribe()
        };
        let peers = complete
            .wait_for(|p| p.is_some())
            .await
            .map_err(|_| Status::aborted("the attempt was replaced before the gang completed"))?
            .clone()
            .unwrap_or_default();
        Ok(Response::new(RegisterReply { peers }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        let id = self.admit(req.id.as_ref())?;
        lock(&self.state).heartbeats.insert(id.rank, (Instant::now(), req.step));
        Ok(Response::new(Ack {}))
    }

    async fn report_step(&self, request: Request<StepMetrics>) -> Result<Response<Ack>, Status> {
        let metrics = request.into_inner();
        self.admit(metrics.id.as_ref())?;
        let _ = self.events.send(CoordinatorEvent::Step(metrics));
        Ok(Response::new(Ack {}))
    }

    async fn report_failure(&self, request: Request<FailureReport>) -> Result<Response<Ack>, Status> {
        let report = request.into_inner();
        self.admit(report.id.as_ref())?;
        let _ = self.events.send(CoordinatorEvent::Failure(report));
        Ok(Response::new(Ack {}))
    }
}
