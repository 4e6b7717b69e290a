//! `rtrain bench control-plane`: N simulated ranks register, rendezvous and heartbeat at 1 Hz
//! against one coordinator, with the calls a real worker makes (`trainer/src/runtime/control.rs`):
//! `Register` with a collective address, then its step counter every second on one long-lived
//! `Heartbeats` stream.
//!
//! Coordinator and ranks share this process. The coordinator runs on a runtime of its own, with
//! as many threads as the driver's, and its CPU is read from those threads' clocks
//! ([`RuntimeCpu`]), so the ranks' work is not counted as the coordinator's; on a small machine
//! both still compete for the same cores, so the ranks check their peer lists from a digest
//! ([`PeerDigest`]) rather than decoding N × N strings. The ranks share a few HTTP/2 connections
//! (rank r uses connection r mod `connections`), where real workers each open their own:
//! thousands of sockets would run into fd and ephemeral-port limits.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::peer_digest::PeerDigest;
use super::thread_cpu::RuntimeCpu;
use crate::coordinator::{CoordinatorEvent, start_coordinator};
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{RegisterRequest, TokenInterceptor, WorkerId};

/// docs/DESIGN.md §11.8: 4096 ranks rendezvous in under 2 s...
pub const RENDEZVOUS_TARGET_S: f64 = 2.0;
/// ...and their heartbeats cost the coordinator under 5% of one core.
pub const HEARTBEAT_CPU_TARGET_PERCENT: f64 = 5.0;

const ROLE: &str = "trainer";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// The driver's runtime, which hosts the coordinator in `rtrain launch`, has two threads.
const COORDINATOR_THREADS: usize = 2;
const COORDINATOR_THREAD_NAME: &str = "rtrain-coord";
const RANK_THREADS: usize = 2;
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

/// What to simulate.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    pub ranks: usize,
    /// How long heartbeats are measured, once every rank has its peer list.
    pub window: Duration,
    /// HTTP/2 connections the ranks share.
    pub connections: usize,
}

/// The figures for one gang size.
#[derive(Debug, Clone, Serialize)]
pub struct ControlPlaneReport {
    pub ranks: usize,
    pub connections: usize,
    /// First Register sent → last RegisterReply received.
    pub rendezvous_s: f64,
    pub rendezvous_target_s: f64,
    /// First Register sent → the driver's event that the gang is complete (the last Register
    /// handled; replies are still to be sent).
    pub gang_complete_s: Option<f64>,
    /// CPU seconds up to the gang's completion: the coordinator's and the simulated ranks'.
    pub gang_complete_coordinator_cpu_s: Option<f64>,
    pub gang_complete_ranks_cpu_s: Option<f64>,
    /// CPU seconds during the whole rendezvous: the coordinator's and the simulated ranks'.
    pub rendezvous_coordinator_cpu_s: f64,
    pub rendezvous_ranks_cpu_s: f64,
    /// Replies holding every rank's address, in rank order.
    pub peer_lists_complete: usize,
    pub register_errors: usize,
    pub window_s: f64,
    /// Beats the coordinator recorded during the window (each advances its rank's step by one).
    pub heartbeats_accepted: u64,
    /// Heartbeat streams the coordinator ended (each ends a rank's beats).
    pub heartbeats_refused: u64,
    pub heartbeats_per_s: f64,
    /// Ranks whose last heartbeat the coordinator holds, under 3 s old and past step 0.
    pub ranks_heartbeating: usize,
    /// Coordinator CPU seconds over the window / the window, as % of one core.
    pub coordinator_cpu_percent: f64,
    pub coordinator_cpu_target_percent: f64,
    /// The first refusal, of a Register or a Heartbeat.
    pub first_error: Option<String>,
}

impl ControlPlaneReport {
    /// Every rank got the whole peer list and every heartbeat was accepted.
    pub fn correct(&self) -> bool {
        self.peer_lists_complete == self.ranks
            && self.register_errors == 0
            && self.heartbeats_refused == 0
            && self.ranks_heartbeating == self.ranks
    }
}

/// `rtrain bench control-plane`.
pub fn control_plane_command(ranks: &[usize], seconds: f64, connections: usize, json: bool) -> ExitCode {
    if !(seconds >= 1.0 && seconds.is_finite()) || ranks.contains(&0) || connections == 0 {
        eprintln!("error: control-plane benchmark: needs --seconds ≥ 1, ranks ≥ 1 and --connections ≥ 1");
        return ExitCode::from(crate::cli::EXIT_CONFIG);
    }
    let mut reports = Vec::new();
    for &n in ranks {
        let opts = ControlPlaneOptions { ranks: n, window: Duration::from_secs_f64(seconds), connections };
        if !json {
            eprintln!("control plane: {n} ranks on {} connections, {seconds} s of heartbeats", connections.min(n));
        }
        match control_plane(&opts) {
            Ok(report) if json => {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
                reports.push(report);
            }
            Ok(report) => reports.push(report),
            Err(e) => {
                eprintln!("error: control-plane benchmark, {n} ranks: {e}");
                return ExitCode::from(crate::cli::EXIT_FAILED);
            }
        }
    }
    if !json {
        print_table(&reports);
    }
    match reports.iter().find(|r| !r.correct()) {
        None => ExitCode::SUCCESS,
        Some(r) => {
            eprintln!(
                "error: {} ranks: {} of {} peer lists complete, {} Register errors, {} heartbeats refused, {} ranks \
                 heartbeating; first error: {}",
                r.ranks,
                r.peer_lists_complete,
                r.ranks,
                r.register_errors,
                r.heartbeats_refused,
                r.ranks_heartbeating,
                r.first_error.as_deref().unwrap_or("none")
            );
            ExitCode::from(crate::cli::EXIT_FAILED)
        }
    }
}

fn print_table(reports: &[ControlPlaneReport]) {
    println!(
        "{:>6} {:>5} {:>12} {:>7} {:>11} {:>13} {:>9} {:>8} {:>16} {:>7}",
        "ranks",
        "conns",
        "rendezvous",
        "target",
        "peer lists",
        "heartbeats/s",
        "expected",
        "refused",
        "coordinator CPU",
        "target"
    );
    for r in reports {
        println!(
            "{:>6} {:>5} {:>10.3} s {:>7} {:>11} {:>13.1} {:>9} {:>8} {:>15.2}% {:>7}",
            r.ranks,
            r.connections,
            r.rendezvous_s,
            format!("< {} s", r.rendezvous_target_s),
            format!("{}/{}", r.peer_lists_complete, r.ranks),
            r.heartbeats_per_s,
            r.ranks,
            r.heartbeats_refused,
            r.coordinator_cpu_percent,
            format!("< {}%", r.coordinator_cpu_target_percent)
        );
    }
    let secs = |s: Option<f64>| s.map_or("?".into(), |s| format!("{s:.2} s"));
    for r in reports {
        println!(
            "  {} ranks: gang complete at {} (CPU so far: coordinator {}, ranks {}); last reply at {:.2} s (CPU: \
             coordinator {:.2} s, ranks {:.2} s)",
            r.ranks,
            secs(r.gang_complete_s),
            secs(r.gang_complete_coordinator_cpu_s),
            secs(r.gang_complete_ranks_cpu_s),
            r.rendezvous_s,
            r.rendezvous_coordinator_cpu_s,
            r.rendezvous_ranks_cpu_s
        );
    }
    println!("  (simulated ranks share the connections listed; real workers open one each)");
}

/// Heartbeat streams refused during the run, across ranks.
#[derive(Default)]
struct Beats {
    refused: AtomicU64,
    first_error: OnceLock<String>,
}

/// A rank's rendezvous: when its reply came, and whether it held the whole peer list.
struct Joined {
    at: Instant,
    result: Result<bool, String>,
}

/// Starts a coordinator with one gang role of `opts.ranks` ranks, runs the ranks against it and
/// measures (takes about `opts.window` plus the rendezvous).
pub fn control_plane(opts: &ControlPlaneOptions) -> Result<ControlPlaneReport, String> {
    let ranks = opts.ranks;
    let connections = opts.connections.clamp(1, ranks.max(1));
    let coordinator_cpu = Arc::new(RuntimeCpu::default());
    let ranks_cpu = Arc::new(RuntimeCpu::default());
    let io = |what: &str, e: std::io::Error| format!("cannot start the {what} runtime: {e}");
    let coordinator_rt =
        coordinator_cpu.runtime(COORDINATOR_THREAD_NAME, COORDINATOR_THREADS).map_err(|e| io("coordinator", e))?;
    let ranks_rt = ranks_cpu.runtime("bench-ranks", RANK_THREADS).map_err(|e| io("ranks'", e))?;

    let token = "control-plane-bench";
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let (coordinator, mut events) = coordinator_rt
        .block_on(start_coordinator(bind, token.into(), Some(ROLE.into())))
        .map_err(|e| format!("cannot start the coordinator: {e}"))?;
    coordinator.begin_attempt(ROLE, 0, ranks);
    // The driver's supervision loop reads these events beside the coordinator; here only the
    // gang's completion matters.
    let cpu = (coordinator_cpu.clone(), ranks_cpu.clone());
    let gang_complete = coordinator_rt.spawn(async move {
        while let Some(event) = events.recv().await {
            if let CoordinatorEvent::GangComplete { .. } = event {
                return Some((Instant::now(), cpu.0.total(), cpu.1.total()));
            }
        }
        None
    });
    let connections = (0..connections)
        .map(|_| open(&ranks_rt, coordinator.addr, token))
        .collect::<Result<Vec<Connection>, String>>()?;
    // Nobody connects to these; they only travel in the peer lists.
    let peers: Vec<String> = (0..ranks).map(|r| format!("127.0.0.1:{}", 10_000 + r % 50_000)).collect();
    let expected = Arc::new(PeerDigest::of(&peers));

    let beats = Arc::new(Beats::default());
    let (stop, stopped) = watch::channel(false);
    let (joined_tx, mut joined_rx) = mpsc::unbounded_channel();
    let cpu_before = (coordinator_cpu.total(), ranks_cpu.total());
    let start = Instant::now();
    let tasks: Vec<_> = peers
        .into_iter()
        .enumerate()
        .map(|(rank, collective_addr)| {
            let id = WorkerId { role: ROLE.into(), rank: rank as u32, attempt: 0 };
            let register = RegisterRequest { id: Some(id), collective_addr };
            let connection = connections[rank % connections.len()].clone();
            let run = simulated_rank(
                connection,
                register,
                expected.clone(),
                joined_tx.clone(),
                beats.clone(),
                stopped.clone(),
            );
            ranks_rt.spawn(run)
        })
        .collect();
    drop(joined_tx);
    let joined = ranks_rt.block_on(async {
        let mut joined = Vec::with_capacity(ranks);
        let all = async {
            while joined.len() < ranks {
                match joined_rx.recv().await {
                    Some(j) => joined.push(j),
                    None => break,
                }
            }
        };
        let finished = tokio::time::timeout(RENDEZVOUS_TIMEOUT, all).await.is_ok();
        finished.then_some(joined)
    });
    let rendezvous_cpu = (coordinator_cpu.total() - cpu_before.0, ranks_cpu.total() - cpu_before.1);
    let Some(joined) = joined.filter(|j| j.len() == ranks) else {
        let _ = stop.send(true);
        coordinator.shutdown();
        return Err(format!("the rendezvous did not complete within {RENDEZVOUS_TIMEOUT:?}"));
    };
    let last_reply = joined.iter().map(|j| j.at).max().unwrap_or(start);
    let gang_complete = coordinator_rt.block_on(gang_complete).ok().flatten();
    let complete_cpu = gang_complete.map(|(_, c, r)| (c - cpu_before.0, r - cpu_before.1));

    // Start half a period after the rendezvous, so the window holds whole rounds of heartbeats.
    std::thread::sleep((last_reply + HEARTBEAT_EVERY / 2).saturating_duration_since(Instant::now()));
    // Read on this thread, outside the coordinator's runtime, so it is not counted as its CPU.
    let steps = || coordinator.heartbeats(ROLE).values().map(|(_, step)| step).sum::<u64>();
    let (cpu0, accepted0, t0) = (coordinator_cpu.total(), steps(), Instant::now());
    std::thread::sleep(opts.window);
    let (cpu1, accepted1, wall) = (coordinator_cpu.total(), steps(), t0.elapsed());
    let seen = coordinator.heartbeats(ROLE);
    let ranks_heartbeating = seen.values().filter(|(age, step)| *age < 3.0 && *step >= 1).count();

    let _ = stop.send(true);
    ranks_rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
    });
    coordinator.shutdown();
    ranks_rt.shutdown_timeout(Duration::from_secs(1));
    coordinator_rt.shutdown_timeout(Duration::from_secs(1));

    let register_error = joined.iter().find_map(|j| j.result.as_ref().err().cloned());
    Ok(ControlPlaneReport {
        ranks,
        connections: connections.len(),
        rendezvous_s: (last_reply - start).as_secs_f64(),
        rendezvous_target_s: RENDEZVOUS_TARGET_S,
        gang_complete_s: gang_complete.map(|(at, _, _)| (at - start).as_secs_f64()),
        gang_complete_coordinator_cpu_s: complete_cpu.map(|c| c.0.as_secs_f64()),
        gang_complete_ranks_cpu_s: complete_cpu.map(|c| c.1.as_secs_f64()),
        rendezvous_coordinator_cpu_s: rendezvous_cpu.0.as_secs_f64(),
        rendezvous_ranks_cpu_s: rendezvous_cpu.1.as_secs_f64(),
        peer_lists_complete: joined.iter().filter(|j| j.result == Ok(true)).count(),
        register_errors: joined.iter().filter(|j| j.result.is_err()).count(),
        window_s: wall.as_secs_f64(),
        heartbeats_accepted: accepted1.saturating_sub(accepted0),
        heartbeats_refused: beats.refused.load(Ordering::Relaxed),
        heartbeats_per_s: accepted1.saturating_sub(accepted0) as f64 / wall.as_secs_f64(),
        ranks_heartbeating,
        coordinator_cpu_percent: 100.0 * (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64(),
        coordinator_cpu_target_percent: HEARTBEAT_CPU_TARGET_PERCENT,
        first_error: register_error.or_else(|| beats.first_error.get().cloned()),
    })
}

/// One HTTP/2 connection to the coordinator, carrying the job token as a worker's does.
type Connection = InterceptedService<Channel, TokenInterceptor>;

/// A lazily connected channel, set up as `job_client::connect` sets up a worker's.
fn open(runtime: &tokio::runtime::Runtime, addr: SocketAddr, token: &str) -> Result<Connection, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let interceptor = TokenInterceptor::new(token).map_err(|e| e.to_string())?;
    let _guard = runtime.enter();
    Ok(InterceptedService::new(endpoint.connect_lazy(), interceptor))
}

/// `Register`, its reply read as a [`PeerDigest`]: the same call and bytes as a worker's.
async fn register(connection: Connection, request: RegisterRequest) -> Result<PeerDigest, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(connection);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<RegisterRequest, PeerDigest>::default();
    let path = PathAndQuery::from_static("/rtrain.v1.Coordinator/Register");
    Ok(grpc.unary(tonic::Request::new(request), path, codec).await?.into_inner())
}

/// One rank, as a worker's control plane runs it: register, then heartbeat on one stream with its
/// step every second (the step advances by one per heartbeat) until stopped.
async fn simulated_rank(
    connection: Connection,
    request: RegisterRequest,
    expected: Arc<PeerDigest>,
    joined: mpsc::UnboundedSender<Joined>,
    beats: Arc<Beats>,
    mut stopped: watch::Receiver<bool>,
) {
    let id = request.id.clone().unwrap_or_default();
    let reply = register(connection.clone(), request).await;
    let at = Instant::now();
    let result = match reply {
        Ok(peers) => Ok(peers.matches(&expected)),
        Err(status) => Err(format!("rank {}: Register: {}", id.rank, status.message())),
    };
    let registered = result.is_ok();
    let _ = joined.send(Joined { at, result });
    if !registered {
        return;
    }
    let mut client = CoordinatorClient::new(connection);
    let mut step = 0;
    let stream = crate::heartbeat::beats(id.clone(), HEARTBEAT_EVERY, move || {
        step += 1;
        step
    });
    tokio::select! {
        result = client.heartbeats(stream) => {
            let why = result.err().map_or_else(|| "the stream ended".to_string(), |s| s.message().to_string());
            let _ = beats.first_error.set(format!("rank {}: Heartbeats: {why}", id.rank));
            beats.refused.fetch_add(1, Ordering::Relaxed);
        }
        _ = stopped.changed() => {}
    }
}
