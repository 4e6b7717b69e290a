//! The trainer's side of cross-host weight sync: a TCP server that streams the newest version to
//! any authenticated subscriber that holds an older one.
//!
//! One thread accepts; each connection gets its own thread and deadlines (handshake, every
//! chunk, the whole transfer), so a silent or slow client holds only its own connection. A
//! publish swaps in a new immutable image; transfers in progress finish the one they started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;

use super::error::{SyncResult, WeightSyncError};
use super::shm_subscriber::SyncedVersion;
use super::table::{WeightTable, readable};
use super::wire::{self, ClientHello, NONCE, net};

/// Where and how a [`WeightServer`] serves.
#[derive(Debug, Clone)]
pub struct WeightServerConfig {
    /// Address to bind (port 0 picks a free one; see [`WeightServer::local_addr`]).
    pub addr: SocketAddr,
    /// The job token both sides prove they know. Must not be empty.
    pub token: Vec<u8>,
    /// Connections served at once; more are told to retry.
    pub max_connections: usize,
    /// Limit for a client to complete the handshake.
    pub handshake_timeout: Duration,
    /// Limit for each chunk of the image to be accepted by the client.
    pub io_timeout: Duration,
    /// Limit for a whole connection.
    pub transfer_timeout: Duration,
}

impl WeightServerConfig {
    pub fn new(addr: SocketAddr, token: impl Into<Vec<u8>>) -> Self {
        WeightServerConfig {
            addr,
            token: token.into(),
            max_connections: 32,
            handshake_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            transfer_timeout: Duration::from_secs(600),
        }
    }
}

/// One published version, immutable once shared with connections.
struct Image {
    version: u64,
    table: Vec<u8>,
    data: Vec<u8>,
}

struct Shared {
    config: WeightServerConfig,
    generation: u64,
    current: Mutex<Option<Arc<Image>>>,
    active: AtomicUsize,
    stop: AtomicBool,
}

/// Serves the newest published version over TCP until dropped.
pub struct WeightServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    table: Option<WeightTable>,
    last_version: Option<u64>,
    /// The image before the current one, reused by the next publish once no transfer holds it.
    spare: Option<Arc<Image>>,
}

impl std::fmt::Debug for WeightServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightServer")
            .field("local_addr", &self.local_addr)
            .field("generation", &self.shared.generation)
            .field("last_version", &self.last_version)
            .finish()
    }
}

impl WeightServer {
    /// Binds and starts accepting. Clients get "nothing published" until the first publish.
    pub fn start(config: WeightServerConfig) -> SyncResult<Self> {
        if config.token.is_empty() {
            return Err(WeightSyncError::AuthFailed { peer: config.addr.to_string(), detail: "empty token" });
        }
        let peer = config.addr.to_string();
        let listener = net(TcpListener::bind(config.addr), "cannot bind", &peer)?;
        let local_addr = net(listener.local_addr(), "cannot read the address of", &peer)?;
        let shared = Arc::new(Shared {
            config,
            generation: wire::random_u64()?.max(1),
            current: Mutex::new(None),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("weight-server".into())
            .spawn(move || accept_loop(&listener, &accept_shared))
            .map_err(|e| WeightSyncError::Net { op: "cannot start the accept thread for", peer, source: e })?;
        Ok(WeightServer { shared, local_addr, accept: Some(accept), table: None, last_version: None, spare: None })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Tells this server's versions from an earlier or later server's.
    pub fn generation(&self) -> u64 {
        self.shared.generation
    }

    /// Makes `tensors` the version served from now on. The first publish fixes the tensor set;
    /// later ones must match it (any order). Costs one copy of the weights.
    pub fn publish(&mut self, version: u64, tensors: &[(String, Tensor)]) -> SyncResult<()> {
        if let Some(last) = self.last_version.filter(|last| version <= *last) {
            return Err(WeightSyncError::VersionNotNewer { version, last });
        }
        let table = match self.table.take() {
            Some(table) => table,
            None => WeightTable::from_tensors(tensors)?,
        };
        let result = self.fill_and_swap(&table, version, tensors);
        self.table = Some(table);
        result
    }

    fn fill_and_swap(&mut self, table: &WeightTable, version: u64, tensors: &[(String, Tensor)]) -> SyncResult<()> {
        let entries = table.match_tensors(tensors)?;
        let sources = tensors.iter().map(|(name, t)| readable(name, t)).collect::<SyncResult<Vec<_>>>()?;
        let mut image = match self.spare.take().and_then(|spare| Arc::try_unwrap(spare).ok()) {
            Some(image) => image,
            None => Image { version, table: table.encode(), data: vec![0u8; table.data_bytes() as usize] },
        };
        image.version = version;
        for (src, entry) in sources.iter().zip(entries) {
            if entry.bytes == 0 {
                continue;
            }
            let (at, n) = (entry.offset as usize, entry.bytes as usize);
            // SAFETY: `src` is a contiguous CPU tensor of `n` bytes (dtype and shape matched),
            // private to this process and not written during the publish.
            let bytes = unsafe { std::slice::from_raw_parts(src.data_ptr().cast::<u8>(), n) };
            image.data[at..at + n].copy_from_slice(bytes);
        }
        let old = self.shared.current.lock().unwrap_or_else(PoisonError::into_inner).replace(Arc::new(image));
        self.spare = old;
        self.last_version = Some(version);
        Ok(())
    }
}

impl Drop for WeightServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept; if that fails the thread is left to exit at its next accept.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok()
            && let Some(accept) = self.accept.take()
        {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "weight server: accept failed");
                // Out of file descriptors and the like: give connections time to finish.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream.peer_addr().map_or_else(|_| "unknown peer".to_string(), |a| a.to_string());
        if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.config.max_connections {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(&wire::server_hello(wire::HELLO_BUSY, &[0; NONCE]));
            continue;
        }
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new().name("weight-serve".into()).spawn(move || {
            if let Err(e) = serve(stream, &conn_shared, &peer) {
                tracing::warn!(peer, error = %e, "weight server: transfer failed");
            }
            conn_shared.active.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "weight server: cannot start a connection thread");
        }
    }
}

/// One connection: handshake, then the newest version if it supersedes the client's.
fn serve(mut stream: TcpStream, shared: &Shared, peer: &str) -> SyncResult<()> {
    let config = &shared.config;
    let deadline = Instant::now() + config.transfer_timeout;
    net(stream.set_nodelay(true), "cannot configure", peer)?;
    net(stream.set_read_timeout(Some(config.handshake_timeout)), "cannot configure", peer)?;
    net(stream.set_write_timeout(Some(config.handshake_timeout)), "cannot configure", peer)?;
    let mut server_nonce = [0u8; NONCE];
    wire::fill_random(&mut server_nonce)?;
    net(stream.write_all(&wire::server_hello(wire::HELLO_READY, &server_nonce)), "cannot greet", peer)?;
    let mut hello = [0u8; wire::CLIENT_HELLO];
    net(stream.read_exact(&mut hello), "no hello from", peer)?;
    let hello =
        ClientHello::decode(&hello).ok_or_else(|| WeightSyncError::corrupt(peer, "the client's hello is malformed"))?;
    if !wire::verify(&config.token, b"client", &server_nonce, &hello.nonce, &hello.mac) {
        let _ = stream.write_all(&[wire::TOKEN_REFUSED]);
        return Err(WeightSyncError::AuthFailed { peer: peer.to_string(), detail: "the client's token is wrong" });
    }
    let proof = wire::sign(&config.token, b"server", &hello.nonce, &server_nonce);
    let image = shared.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut head = Vec::with_capacity(64);
    let Some(image) = image else {
        head.push(wire::NOT_PUBLISHED);
        head.extend_from_slice(&proof);
        return net(stream.write_all(&head), "cannot answer", peer);
    };
    let current = SyncedVersion { generation: shared.generation, version: image.version };
    if hello.have.is_some_and(|have| !have.is_superseded_by(current)) {
        head.push(wire::UP_TO_DATE);
        head.extend_from_slice(&proof);
        head.extend_from_slice(&current.generation.to_le_bytes());
        head.extend_from_slice(&current.version.to_le_bytes());
        return net(stream.write_all(&head), "cannot answer", peer);
    }
    head.push(wire::WEIGHTS);
    head.extend_from_slice(&proof);
    head.extend_from_slice(&current.generation.to_le_bytes());
    head.extend_from_slice(&current.version.to_le_bytes());
    head.extend_from_slice(&(image.data.len() as u64).to_le_bytes());
    head.extend_from_slice(&(image.table.len() as u32).to_le_bytes());
    head.extend_from_slice(&image.table);
    net(stream.write_all(&head), "cannot send the header to", peer)?;
    let written = wire::write_chunked(&mut &stream, &image.data, || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "transfer deadline passed"));
        }
        stream.set_write_timeout(Some(left.min(config.io_timeout)))
    });
    net(written, "cannot stream the weights to", peer)?;
    net(stream.flush(), "cannot stream the weights to", peer)
}
