//! Forming the TCP ring: every rank binds first (so it can publish its address before it knows
//! its peers), then connects to rank + 1 and accepts rank - 1, both at once.
//!
//! Each connection opens with the handshake of [`super::tcp_handshake`]: ranks, world size and
//! session (attempt) must match, and both ends prove that they hold the job token. Anyone on the
//! host can reach the listener, so accepting never waits on one connection: each is greeted on its
//! own thread with a short deadline, and a silent, garbled, stale or unauthenticated connection
//! is dropped while the rank keeps waiting for its real predecessor until the ring's timeout.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::CollectiveError;
use super::ring_transfer::RingLinks;
use super::tcp::TcpCollective;
use super::tcp_handshake::{self, Hello, JobKey, Refusal};

/// Pause between connection attempts while the successor is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// How long an accepted connection has to complete its handshake. A real peer answers in
/// microseconds (both ends are in `connect`); this only bounds what a stray connection holds.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);
/// Connections greeted at once; more are dropped unread until some finish.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// How often the accept loop looks for a finished handshake or a stop request.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// What the dialing side tells the accept loop.
const KEEP_ACCEPTING: u8 = 0;
/// The dial failed: stop at once.
const STOP: u8 = 1;
/// The successor holds another token: keep answering for up to [`HANDSHAKE_DEADLINE`], so that the
/// predecessor, which most likely holds the same other token, hears a refusal too instead of
/// finding the listener closed and waiting out its timeout.
const STOP_AFTER_REFUSING: u8 = 2;

/// The outcome of greeting one connection.
enum Greeted {
    Link(TcpStream),
    /// It spoke as the predecessor but could not prove it holds the token.
    WrongToken,
}

/// A bound listener whose address can be published before the peers are known.
#[derive(Debug)]
pub struct TcpRendezvousPoint {
    listener: TcpListener,
    addr: String,
    session: u64,
}

/// Binds a listener on `host`, port 0. `host` must be the address peers reach this worker at.
pub(crate) fn bind(host: &str) -> io::Result<TcpRendezvousPoint> {
    let listener = TcpListener::bind((host, 0))?;
    let port = listener.local_addr()?.port();
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(TcpRendezvousPoint { listener, addr, session: 0 })
}

impl TcpRendezvousPoint {
    /// The `host:port` string to publish to the other ranks.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Tags the ring with a session id (e.g. the attempt number): connections carrying another
    /// id, such as a worker left over from an earlier attempt, are refused.
    pub fn with_session(mut self, session: u64) -> Self {
        self.session = session;
        self
    }

    /// Connects the ring. `peers[r]` is rank `r`'s published address (this rank's included);
    /// `token` is the job's secret (`RTRAIN_JOB_TOKEN`), which every rank must hold. Gives up
    /// with `Timeout` when the ring is not complete after `timeout`, which also becomes the
    /// communicator's per-operation timeout, and with `Unauthenticated` as soon as a neighbour
    /// holds another token.
    pub fn connect(
        self,
        rank: usize,
        peers: &[String],
        token: &str,
        timeout: Duration,
    ) -> Result<TcpCollective, CollectiveError> {
        let world = peers.len();
        let invalid_input = |message: String| CollectiveError::Io {
            op: "connect",
            peer: rank,
            source: io::Error::new(io::ErrorKind::InvalidInput, message),
        };
        if rank >= world {
            return Err(invalid_input(format!("rank {rank} is outside a world of {world} peers")));
        }
        let key = JobKey::new(token).ok_or_else(|| invalid_input("the job token is empty".into()))?;
        if world == 1 {
            return Ok(TcpCollective::from_links(rank, 1, None, timeout));
        }
        let ring = Ring { rank, world, session: self.session, key, timeout, deadline: Instant::now() + timeout };
        let links = ring.form(&self.listener, peers)?;
        tracing::debug!(rank, world, session = self.session, "tcp ring connected");
        Ok(TcpCollective::from_links(rank, world, Some(links), timeout))
    }
}

/// What forming one rank's links needs to know.
struct Ring {
    rank: usize,
    world: usize,
    session: u64,
    key: JobKey,
    timeout: Duration,
    deadline: Instant,
}

impl Ring {
    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn hello(&self, rank: usize) -> Result<Hello, CollectiveError> {
        Hello::fresh(rank, self.world, self.session).map_err(|source| CollectiveError::Io {
            op: "connect",
            peer: self.rank,
            source: io::Error::new(source.kind(), format!("cannot draw a handshake nonce: {source}")),
        })
    }

    /// Dials the successor while a second thread accepts the predecessor: every rank does both,
    /// and each handshake needs its far end to answer, so doing them one after the other would
    /// deadlock round the ring.
    fn form(&self, listener: &TcpListener, peers: &[String]) -> Result<RingLinks, CollectiveError> {
        let stop = AtomicU8::new(KEEP_ACCEPTING);
        let (next, prev) = std::thread::scope(|scope| {
            let acceptor = scope.spawn(|| self.accept_prev(listener, &stop));
            let next = self.dial_next(&peers[self.next_rank()]);
            match &next {
                Ok(_) => {}
                Err(CollectiveError::Unauthenticated { .. }) => stop.store(STOP_AFTER_REFUSING, Ordering::Relaxed),
                Err(_) => stop.store(STOP, Ordering::Relaxed),
            }
            let prev = acceptor.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (next, prev)
        });
        let next = next?;
        let prev = prev?;
        for (stream, peer) in [(&next, self.next_rank()), (&prev, self.prev_rank())] {
            tune(stream, self.timeout).map_err(|e| CollectiveError::Io { op: "connect", peer, source: e })?;
        }
        Ok(RingLinks { rank: self.rank, next, prev, next_rank: self.next_rank(), prev_rank: self.prev_rank() })
    }

    /// Connects to the successor and completes the handshake, retrying until the deadline
    /// while it is not listening or answers wrongly; fails at once when it holds another token.
    fn dial_next(&self, addr: &str) -> Result<TcpStream, CollectiveError> {
        let peer = self.next_rank();
        let expected = Hello::expected(peer, self.world, self.session);
        loop {
            let stream = dial(addr, peer, self.deadline, self.timeout)?;
            let me = self.hello(self.rank)?;
            let _ = stream.set_nodelay(true);
            // The listener there is the successor's own: a slow answer is a busy peer, not a
            // stranger, so it gets the whole remaining time.
            let outcome = set_timeouts(&stream, remaining(self.deadline))
                .map_err(Refusal::from)
                .and_then(|()| tcp_handshake::dial(&stream, &me, &expected, &self.key));
            match outcome {
                Ok(()) => return Ok(stream),
                Err(Refusal::WrongToken(reason)) => return Err(CollectiveError::Unauthenticated { peer, reason }),
                Err(Refusal::Other(e)) => {
                    tracing::debug!(rank = self.rank, peer, error = %e, "ring successor handshake failed; retrying");
                }
            }
            if Instant::now() + RETRY_PAUSE >= self.deadline {
                return Err(CollectiveError::Timeout { op: "connect", peer, after: self.timeout });
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// Accepts connections until one completes the handshake as the predecessor, greeting each
    /// on its own thread. Fails at the deadline (`Unauthenticated` if connections as the
    /// predecessor came but failed to prove the token, else `Timeout`) or when `stop` says so.
    fn accept_prev(&self, listener: &TcpListener, stop: &AtomicU8) -> Result<TcpStream, CollectiveError> {
        let peer = self.prev_rank();
        let io_err = |source| CollectiveError::Io { op: "connect", peer, source };
        listener.set_nonblocking(true).map_err(io_err)?;
        let (done, greeted) = mpsc::channel::<Greeted>();
        let pending = Arc::new(AtomicUsize::new(0));
        let expected = Hello::expected(peer, self.world, self.session);
        let mut wrong_tokens = 0;
        let mut grace_until = None;
        loop {
            match greeted.try_recv() {
                Ok(Greeted::Link(stream)) => return Ok(stream),
                Ok(Greeted::WrongToken) => wrong_tokens += 1,
                Err(_) => {}
            }
            let now = Instant::now();
            let stopped = match stop.load(Ordering::Relaxed) {
                STOP => true,
                STOP_AFTER_REFUSING => {
                    let until = *grace_until.get_or_insert(now + HANDSHAKE_DEADLINE);
                    wrong_tokens > 0 || now >= until
                }
                _ => false,
            };
            if stopped || now >= self.deadline {
                return Err(match wrong_tokens {
                    0 => CollectiveError::Timeout { op: "connect", peer, after: self.timeout },
                    n => CollectiveError::Unauthenticated {
                        peer,
                        reason: format!("{n} connection(s) as rank {peer} did not prove they hold the job token"),
                    },
                });
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_readable(listener, ACCEPT_POLL);
                    continue;
                }
                // Aborted handshakes and the like: keep listening.
                Err(_) => continue,
            };
            if pending.load(Ordering::Relaxed) >= MAX_PENDING_HANDSHAKES {
                tracing::warn!(rank = self.rank, "too many ring connections in their handshake; dropped one");
                continue;
            }
            let greeting = Greeting {
                rank: self.rank,
                expected,
                me: self.hello(self.rank)?,
                key: self.key.clone(),
                deadline: (Instant::now() + HANDSHAKE_DEADLINE).min(self.deadline),
            };
            pending.fetch_add(1, Ordering::Relaxed);
            let (done, pending_now) = (done.clone(), Arc::clone(&pending));
            let spawned = std::thread::Builder::new().name("rtrain-ring-hello".into()).spawn(move || {
                if let Some(outcome) = greeting.run(stream) {
                    // The receiver is gone once the loop has returned: a late link is dropped.
                    let _ = done.send(outcome);
                }
                pending_now.fetch_sub(1, Ordering::Relaxed);
            });
            if spawned.is_err() {
                pending.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// The acceptor's handshake on one connection, on its own thread.
struct Greeting {
    rank: usize,
    expected: Hello,
    me: Hello,
    key: JobKey,
    deadline: Instant,
}

impl Greeting {
    fn run(self, stream: TcpStream) -> Option<Greeted> {
        let _ = stream.set_nodelay(true);
        let outcome = stream
            .set_nonblocking(false)
            .and_then(|()| set_timeouts(&stream, remaining(self.deadline)))
            .map_err(Refusal::from)
            .and_then(|()| tcp_handshake::accept(&stream, &self.expected, &self.me, &self.key));
        match outcome {
            Ok(()) => Some(Greeted::Link(stream)),
            Err(Refusal::WrongToken(reason)) => {
                tracing::warn!(rank = self.rank, reason, "refused a ring connection without the job token");
                Some(Greeted::WrongToken)
            }
            Err(Refusal::Other(e)) => {
                tracing::warn!(rank = self.rank, error = %e, "refused a ring connection");
                None
            }
        }
    }
}

/// Connects to `addr`, retrying until `deadline` while nobody listens there.
fn dial(addr: &str, peer: usize, deadline: Instant, timeout: Duration) -> Result<TcpStream, CollectiveError> {
    loop {
        let targets: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(targets) => targets.collect(),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                return Err(CollectiveError::Io { op: "connect", peer, source: e });
            }
            // Name resolution may fail transiently while a cluster's DNS catches up.
            Err(_) => Vec::new(),
        };
        for target in &targets {
            if let Ok(stream) = TcpStream::connect_timeout(target, remaining(deadline)) {
                return Ok(stream);
            }
        }
        if Instant::now() + RETRY_PAUSE >= deadline {
            return Err(CollectiveError::Timeout { op: "connect", peer, after: timeout });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// Blocks until `listener` has a pending connection or `timeout` passes.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = timeout.as_millis().clamp(1, 100) as libc::c_int;
    // SAFETY: one valid pollfd for the duration of the call. Errors only shorten the wait.
    unsafe { libc::poll(&mut fd, 1, millis) };
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

/// Per-read and per-write timeouts; zero would mean "block forever" to the OS, so it is clamped.
pub(crate) fn set_timeouts(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let timeout = Some(timeout.max(Duration::from_millis(1)));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)
}

/// Socket options for bulk transfer: no Nagle delay on the small headers, and the operation
/// timeout on every read and write. Buffer sizes stay under kernel autotuning (up to
/// `net.ipv4.tcp_wmem`/`tcp_rmem` max), which beats a fixed `SO_SNDBUF` capped by `wmem_max`.
fn tune(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    set_timeouts(stream, timeout)
}
