//! `tcp`: CPU tensors over TCP, one ring per communicator; works across hosts.
//!
//! All-reduce is the bandwidth-optimal ring of Gloo and NCCL: reduce-scatter then all-gather,
//! `2 (n - 1) / n` of the buffer sent per rank, pipelined in segments so that receiving,
//! reducing and sending overlap. It works on the tensor's own memory: only one segment at a
//! time is staged in a scratch buffer.
//!
//! Run two ranks on one machine:
//! ```no_run
//! # use std::time::Duration;
//! # use rtrain_trainer::collective::{ReduceOp, TcpCollective};
//! let points = [TcpCollective::bind("127.0.0.1")?, TcpCollective::bind("127.0.0.1")?];
//! let peers: Vec<String> = points.iter().map(|p| p.addr().to_string()).collect();
//! // ... each rank, in its own thread or process:
//! # let [point, _] = points;
//! let mut comm = point.connect(0, &peers, "the job token", Duration::from_secs(30))?;
//! let mut grads = vec![1.0f32; 1024];
//! comm.all_reduce_f32(&mut grads, ReduceOp::Avg)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::op_desc::{DType, OpDesc, OpKind};
use super::ring_schedule::{self, Elem, Schedule};
use super::ring_transfer::{self, OpContext, RingLinks};
use super::tcp_rendezvous::{self, TcpRendezvousPoint, set_timeouts};
use super::{Collective, CollectiveError, ReduceOp};

/// Segment size of the pipeline: large enough to amortise a syscall, small enough that a
/// received segment is still in cache when it is reduced.
pub const DEFAULT_SEGMENT_BYTES: usize = 256 * 1024;

/// A ring communicator over TCP for CPU tensors. One owner; every read and write has a timeout.
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The timeout the sockets currently carry; re-applied lazily after `set_timeout`.
    socket_timeout: Duration,
    segment_bytes: usize,
    /// `None` when the world is one rank.
    links: Option<RingLinks>,
    scratch: Vec<u64>,
    /// Number of operations started; every rank counts the same calls, the header checks it.
    seq: u64,
    /// Set by the first failed operation: the ring is shut down and must be rebuilt.
    broken: Option<String>,
}

impl TcpCollective {
    /// Binds a listener on `host` (port 0); publish [`TcpRendezvousPoint::addr`], then
    /// [`TcpRendezvousPoint::connect`] once every rank's address is known.
    pub fn bind(host: &str) -> io::Result<TcpRendezvousPoint> {
        tcp_rendezvous::bind(host)
    }

    /// `world` connected ranks on 127.0.0.1, indexed by rank, for in-process tests and benchmarks.
    /// They share a token drawn at random here, so no other process can join them.
    pub fn loopback_group(world: usize, timeout: Duration) -> Result<Vec<TcpCollective>, CollectiveError> {
        let bind_err = |e| CollectiveError::Io { op: "bind", peer: 0, source: e };
        let points = (0..world).map(|_| Self::bind("127.0.0.1")).collect::<io::Result<Vec<_>>>().map_err(bind_err)?;
        let token = random_token().map_err(bind_err)?;
        let peers: Vec<String> = points.iter().map(|p| p.addr().to_string()).collect();
        std::thread::scope(|scope| {
            let joins: Vec<_> = points
                .into_iter()
                .enumerate()
                .map(|(rank, point)| {
                    let (peers, token) = (&peers, &token);
                    scope.spawn(move || point.connect(rank, peers, token, timeout))
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        })
    }

    pub(crate) fn from_links(rank: usize, world: usize, links: Option<RingLinks>, timeout: Duration) -> Self {
        TcpCollective {
            rank,
            world,
            timeout,
            socket_timeout: timeout,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            links,
            scratch: Vec::new(),
            seq: 0,
            broken: None,
        }
    }

    /// The limit on each blocking read or write of an operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the per-read/per-write timeout; takes effect at the next operation.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(1));
    }

    /// Changes the pipeline segment size (rounded down to whole elements, at least one).
    /// Every rank must use the same value.
    pub fn set_segment_bytes(&mut self, bytes: usize) {
        self.segment_bytes = bytes.max(8);
    }

    /// Sums (or averages) `data` across ranks in place; every rank ends with identical bits.
    pub fn all_reduce_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        // SAFETY: any f32 slice is a valid, aligned byte slice of four times the length.
        let bytes = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), size_of_val(data)) };
        self.all_reduce_bytes(bytes, Elem::F32, op)
    }

    /// [`Self::all_reduce_f32`] for f64.
    pub fn all_reduce_f64(&mut self, data: &mut [f64], op: ReduceOp) -> Result<(), CollectiveError> {
        // SAFETY: any f64 slice is a valid, aligned byte slice of eight times the length.
        let bytes = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), size_of_val(data)) };
        self.all_reduce_bytes(bytes, Elem::F64, op)
    }

    /// Copies `root`'s `data` into every rank's `data` (same length on every rank). Every rank,
    /// the root included, returns an error when the ranks disagree on the call.
    pub fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), CollectiveError> {
        let desc = OpDesc::new(OpKind::Broadcast, DType::Bytes, data.len()).rooted(root);
        self.broadcast_as(data, desc)
    }

    fn broadcast_as(&mut self, data: &mut [u8], desc: OpDesc) -> Result<(), CollectiveError> {
        self.check_root("broadcast", desc.root)?;
        let (rank, world, segment) = (self.rank, self.world, self.segment_bytes);
        let schedule = ring_schedule::broadcast(rank, world, desc.root, data.len(), segment);
        self.run("broadcast", desc, data, &schedule)
    }

    /// Gathers every rank's `input` into `output`, rank `r`'s at `output[r * len..(r + 1) * len]`.
    pub fn all_gather_bytes(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CollectiveError> {
        self.all_gather_as(input, output, OpDesc::new(OpKind::AllGather, DType::Bytes, input.len()))
    }

    fn all_gather_as(&mut self, input: &[u8], output: &mut [u8], desc: OpDesc) -> Result<(), CollectiveError> {
        let len = input.len();
        if output.len() != len * self.world {
            return Err(CollectiveError::Unsupported {
                op: "all_gather",
                reason: format!("output holds {} bytes, expected {} ranks x {len}", output.len(), self.world),
            });
        }
        output[self.rank * len..(self.rank + 1) * len].copy_from_slice(input);
        let schedule = ring_schedule::all_gather(self.rank, self.world, len, self.segment_bytes);
        self.run("all_gather", desc, output, &schedule)
    }

    fn all_reduce_bytes(&mut self, bytes: &mut [u8], elem: Elem, op: ReduceOp) -> Result<(), CollectiveError> {
        let divisor = match op {
            ReduceOp::Sum => None,
            ReduceOp::Avg => Some(self.world as f64),
        };
        let len = bytes.len() / elem.size();
        let schedule = ring_schedule::all_reduce(self.rank, self.world, len, elem, self.segment_bytes, divisor);
        let kind = match elem {
            Elem::F32 => Kind::Float,
            Elem::F64 => Kind::Double,
        };
        let desc = OpDesc::new(OpKind::AllReduce, DType::Tensor(kind), len).reducing(op);
        self.run("all_reduce", desc, bytes, &schedule)
    }

    /// Shuts the ring down, so that both neighbours fail at once, and breaks this communicator.
    /// For a backend built on the ring that has failed on its own.
    pub(crate) fn abort(&mut self, reason: &str) {
        if let Some(links) = &self.links {
            links.shutdown();
        }
        if self.broken.is_none() {
            self.broken = Some(reason.to_string());
        }
    }

    /// A ring neighbour whose connection has closed (its process has exited), found without
    /// blocking; `None` while both links are open. Lets a backend that waits on shared memory
    /// notice a dead peer at once instead of at its timeout.
    pub(crate) fn lost_peer(&self) -> Option<usize> {
        use std::os::fd::AsRawFd;
        let links = self.links.as_ref()?;
        [(&links.prev, links.prev_rank), (&links.next, links.next_rank)].into_iter().find_map(|(stream, peer)| {
            let mut byte = 0u8;
            // SAFETY: a one-byte peek into a local buffer on a socket this collective owns.
            let n = unsafe {
                libc::recv(stream.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
            };
            let would_block = n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
            (n == 0 || (n < 0 && !would_block)).then_some(peer)
        })
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<(), CollectiveError> {
        if root < self.world {
            return Ok(());
        }
        Err(CollectiveError::Unsupported { op, reason: format!("root {root} is outside a world of {}", self.world) })
    }

    fn run(
        &mut self,
        op: &'static str,
        desc: OpDesc,
        buf: &mut [u8],
        schedule: &Schedule,
    ) -> Result<(), CollectiveError> {
        self.seq += 1;
        let Some(links) = &self.links else {
            return Ok(());
        };
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::Io {
                op,
                peer: links.next_rank,
                source: io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("the ring was shut down by an earlier error: {reason}"),
                ),
            });
        }
        if self.socket_timeout != self.timeout {
            for (stream, peer) in [(&links.next, links.next_rank), (&links.prev, links.prev_rank)] {
                set_timeouts(stream, self.timeout).map_err(|source| CollectiveError::Io { op, peer, source })?;
            }
            self.socket_timeout = self.timeout;
        }
        let ctx = OpContext { op, timeout: self.timeout };
        let result = ring_transfer::run(links, buf, schedule, desc.numbered(self.seq), &mut self.scratch, ctx);
        if let Err(e) = &result {
            tracing::warn!(rank = self.rank, op, error = %e, "tcp collective failed; the ring is shut down");
            self.broken = Some(e.to_string());
        }
        result
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError> {
        let elem = match tensor.f_kind() {
            Ok(Kind::Float) => Elem::F32,
            Ok(Kind::Double) => Elem::F64,
            other => {
                return Err(CollectiveError::Unsupported {
                    op: "all_reduce",
                    reason: format!("the tcp backend reduces f32 and f64 tensors, got {other:?}"),
                });
            }
        };
        // SAFETY: `tensor` is borrowed mutably for the whole call.
        let bytes = unsafe { cpu_bytes_mut("all_reduce", tensor) }?;
        self.all_reduce_bytes(bytes, elem, op)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let desc = tensor_desc("broadcast", OpKind::Broadcast, tensor)?.rooted(root);
        // SAFETY: `tensor` is borrowed mutably for the whole call.
        let bytes = unsafe { cpu_bytes_mut("broadcast", tensor) }?;
        self.broadcast_as(bytes, desc)
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        let torch_err = |e: tch::TchError| CollectiveError::Unsupported { op: "all_gather", reason: e.to_string() };
        let input = input.f_contiguous().map_err(torch_err)?;
        let kind = input.f_kind().map_err(torch_err)?;
        let desc = tensor_desc("all_gather", OpKind::AllGather, &input)?;
        let mut gathered =
            Tensor::f_empty([(self.world * input.numel()) as i64], (kind, Device::Cpu)).map_err(torch_err)?;
        {
            // SAFETY: the input is only read, and nothing writes it during the call (its owner
            // lent it for the call); `gathered` is a fresh tensor owned here, the only one written.
            let (input_bytes, output_bytes) =
                unsafe { (cpu_bytes("all_gather", &input)?, cpu_bytes_mut("all_gather", &mut gathered)?) };
            self.all_gather_as(input_bytes, output_bytes, desc)?;
        }
        let mut shape = vec![self.world as i64];
        shape.extend(input.size());
        gathered.f_view(shape.as_slice()).and_then(|t| t.f_unbind(0)).map_err(torch_err)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // A one-byte all-gather: rank r finishes after hearing (via n - 1 hops) from every rank.
        let mut slots = vec![0u8; self.world];
        let schedule = ring_schedule::all_gather(self.rank, self.world, 1, self.segment_bytes);
        self.run("barrier", OpDesc::new(OpKind::Barrier, DType::Bytes, 0), &mut slots, &schedule)
    }
}

/// 32 random hex digits.
fn random_token() -> io::Result<String> {
    use std::io::Read;
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// The [`OpDesc`] of `kind` on `tensor`: its element type and count.
pub(super) fn tensor_desc(op: &'static str, kind: OpKind, tensor: &Tensor) -> Result<OpDesc, CollectiveError> {
    let dtype = tensor.f_kind().map_err(|e| CollectiveError::Unsupported { op, reason: e.to_string() })?;
    Ok(OpDesc::new(kind, DType::Tensor(dtype), tensor.numel()))
}

/// Start and length in bytes of a contiguous, dense CPU tensor's data. The start is null or
/// dangling when the length is zero.
pub(super) fn cpu_data(op: &'static str, tensor: &Tensor) -> Result<(*mut u8, usize), CollectiveError> {
    let unsupported = |reason: String| CollectiveError::Unsupported { op, reason };
    if !tensor.defined() || tensor.is_sparse() || tensor.is_mkldnn() {
        return Err(unsupported("the tensor must be defined and dense".into()));
    }
    match tensor.device() {
        Device::Cpu => {}
        other => {
            return Err(unsupported(format!(
                "the tensor is on {other:?}; the tcp and shm backends move CPU tensors (use nccl for CUDA)"
            )));
        }
    }
    if !tensor.is_contiguous() {
        return Err(unsupported("the tensor is not contiguous; pass tensor.contiguous()".into()));
    }
    let kind = tensor.f_kind().map_err(|e| unsupported(e.to_string()))?;
    Ok((tensor.data_ptr().cast::<u8>(), tensor.numel() * kind.elt_size_in_bytes()))
}

/// The bytes of a contiguous, dense CPU tensor.
///
/// # Safety
/// The caller must hold the only access to the tensor's storage while the slice lives.
pub(super) unsafe fn cpu_bytes_mut<'a>(
    op: &'static str,
    tensor: &'a mut Tensor,
) -> Result<&'a mut [u8], CollectiveError> {
    let (ptr, len) = cpu_data(op, tensor)?;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: a defined, contiguous CPU tensor owns `numel * element size` bytes from data_ptr;
    // exclusivity is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// [`cpu_bytes_mut`], read-only.
///
/// # Safety
/// Nothing may write the tensor's storage while the slice lives.
pub(super) unsafe fn cpu_bytes<'a>(op: &'static str, tensor: &'a Tensor) -> Result<&'a [u8], CollectiveError> {
    let (ptr, len) = cpu_data(op, tensor)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: as in `cpu_bytes_mut`; only reads, and the caller rules out writers.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) })
}
