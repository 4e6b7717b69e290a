//! Forming the TCP ring: every rank binds first (so it can publish its address before it knows
//! its peers), then connects to rank + 1 and accepts rank - 1.
//!
//! Each connection opens with a hello carrying the sender's rank, the world size and a session
//! id; the acceptor answers with its own. A connection from the wrong rank, world or session (a
//! stale attempt, a stray client) is dropped and the rank keeps waiting for the right one.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::CollectiveError;
use super::ring_transfer::{RingLinks, write_all};
use super::tcp::TcpCollective;

/// Native-endian on the wire: a peer with the other byte order sees a wrong magic and is refused,
/// since tensor data is sent in native order too.
const MAGIC: u32 = 0x5254_5243; // "RTRC"
const VERSION: u32 = 1;
const HELLO_LEN: usize = 24;
/// Pause between connection attempts while the successor is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

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
    /// gives up with `Timeout` when the ring is not complete after `timeout`, which also becomes
    /// the communicator's per-operation timeout.
    pub fn connect(self, rank: usize, peers: &[String], timeout: Duration) -> Result<TcpCollective, CollectiveError> {
        let world = peers.len();
        if rank >= world {
            return Err(CollectiveError::Io {
                op: "connect",
                peer: rank,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("rank {rank} is outside a world of {world} peers"),
                ),
            });
        }
        if world == 1 {
            return Ok(TcpCollective::from_links(rank, 1, None, timeout));
        }
        let links = form_ring(&self.listener, rank, peers, self.session, timeout)?;
        tracing::debug!(rank, world, session = self.session, "tcp ring connected");
        Ok(TcpCollective::from_links(rank, world, Some(links), timeout))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    rank: u32,
    world: u32,
    session: u64,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
        out[4..8].copy_from_slice(&VERSION.to_ne_bytes());
        out[8..12].copy_from_slice(&self.rank.to_ne_bytes());
        out[12..16].copy_from_slice(&self.world.to_ne_bytes());
        out[16..24].copy_from_slice(&self.session.to_ne_bytes());
        out
    }

    fn read(stream: &TcpStream) -> io::Result<Hello> {
        let mut raw = [0u8; HELLO_LEN];
        let mut reader = stream;
        reader.read_exact(&mut raw)?;
        let u32_at = |i: usize| u32::from_ne_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        if u32_at(0) != MAGIC || u32_at(4) != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an rtrain tcp collective peer of this version and byte order",
            ));
        }
        let mut session = [0u8; 8];
        session.copy_from_slice(&raw[16..24]);
        Ok(Hello { rank: u32_at(8), world: u32_at(12), session: u64::from_ne_bytes(session) })
    }
}

fn form_ring(
    listener: &TcpListener,
    rank: usize,
    peers: &[String],
    session: u64,
    timeout: Duration,
) -> Result<RingLinks, CollectiveError> {
    let world = peers.len();
    let deadline = Instant::now() + timeout;
    let next_rank = (rank + 1) % world;
    let prev_rank = (rank + world - 1) % world;
    let hello = |r: usize| Hello { rank: r as u32, world: world as u32, session };
    let timed_out = |peer| CollectiveError::Timeout { op: "connect", peer, after: timeout };

    // The successor's listener completes the TCP handshake from its backlog, so dialling before
    // accepting cannot deadlock; the hello waits in the socket until the successor reads it.
    let mut next = dial(&peers[next_rank], next_rank, &hello(rank), deadline, timeout)?;
    let prev = accept_from(listener, hello(prev_rank), &hello(rank), deadline).ok_or_else(|| timed_out(prev_rank))?;
    loop {
        set_timeouts(&next, remaining(deadline)).map_err(|e| CollectiveError::Io {
            op: "connect",
            peer: next_rank,
            source: e,
        })?;
        match Hello::read(&next) {
            Ok(reply) if reply == hello(next_rank) => break,
            Ok(reply) => {
                tracing::warn!(rank, expected = next_rank, got = reply.rank, "ring successor answered as another rank")
            }
            Err(e) => tracing::debug!(rank, peer = next_rank, error = %e, "ring successor refused the connection"),
        }
        if Instant::now() >= deadline {
            return Err(timed_out(next_rank));
        }
        std::thread::sleep(RETRY_PAUSE);
        next = dial(&peers[next_rank], next_rank, &hello(rank), deadline, timeout)?;
    }
    for (stream, peer) in [(&next, next_rank), (&prev, prev_rank)] {
        tune(stream, timeout).map_err(|e| CollectiveError::Io { op: "connect", peer, source: e })?;
    }
    Ok(RingLinks { next, prev, next_rank, prev_rank })
}

/// Connects to `addr` and sends `hello`, retrying until `deadline` while nobody listens there.
fn dial(
    addr: &str,
    peer: usize,
    hello: &Hello,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
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
            let Ok(stream) = TcpStream::connect_timeout(target, remaining(deadline)) else {
                continue;
            };
            let sent = set_timeouts(&stream, remaining(deadline)).and_then(|()| write_all(&stream, &hello.encode()));
            if sent.is_ok() {
                return Ok(stream);
            }
        }
        if Instant::now() + RETRY_PAUSE >= deadline {
            return Err(CollectiveError::Timeout { op: "connect", peer, after: timeout });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// Accepts connections until one says `expected`, answers it with `reply`, and returns it;
/// `None` when `deadline` passes first.
fn accept_from(listener: &TcpListener, expected: Hello, reply: &Hello, deadline: Instant) -> Option<TcpStream> {
    listener.set_nonblocking(true).ok()?;
    while Instant::now() < deadline {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(listener, remaining(deadline));
                continue;
            }
            // Aborted handshakes and the like: keep listening.
            Err(_) => continue,
        };
        let greeted = stream
            .set_nonblocking(false)
            .and_then(|()| set_timeouts(&stream, remaining(deadline)))
            .and_then(|()| Hello::read(&stream));
        match greeted {
            Ok(hello) if hello == expected => {
                if write_all(&stream, &reply.encode()).is_ok() {
                    return Some(stream);
                }
            }
            Ok(hello) => tracing::warn!(
                rank = reply.rank,
                expected_rank = expected.rank,
                got_rank = hello.rank,
                got_world = hello.world,
                got_session = hello.session,
                "refused a ring connection from the wrong rank, world or session"
            ),
            Err(e) => tracing::warn!(rank = reply.rank, error = %e, "refused a ring connection with a bad hello"),
        }
    }
    None
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
