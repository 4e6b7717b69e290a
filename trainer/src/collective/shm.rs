//! `shm`: CPU tensors between ranks on one host, through shared memory.
//!
//! The gang maps one file of `/dev/shm`, created by rank 0 and unlinked as soon as every rank has
//! it mapped (nothing is left behind, whatever happens later). It holds a control line per rank
//! and two sets of staging slots. An all-reduce works chunk by chunk; for each chunk:
//!
//! 1. every rank copies the parts of the chunk that other ranks own into its slot;
//! 2. (barrier) rank `r` sums part `r` in rank order, its own values straight from its tensor
//!    and the others' from their slots, and writes the sum into its tensor and its slot;
//! 3. (barrier) every rank copies the other parts' sums from their owners' slots.
//!
//! All ranks reduce at once, and a rank's bytes cross memory about twice, where loopback TCP
//! copies each byte into and out of the kernel at every hop. Chunks alternate between the two
//! slot sets, so a fast rank stages the next chunk while a slow one still reads the last. Every
//! rank ends with identical bits: each part is summed once, in the same order, by its owner.
//!
//! A buffer from [`Collective::shared_zeros`] lives in shared memory itself (the DDP gradient
//! buffer does): all-reducing it, or a slice of it, skips the staging copies. Rank `r` sums part
//! `r` of every rank's buffer into every rank's buffer.
//!
//! A barrier is a counter per rank: arrive by incrementing your own, then wait until every
//! counter has reached yours. Waiting spins briefly, then yields, then sleeps, and ends with an
//! error at the collective timeout or as soon as a ring neighbour's TCP connection closes (its
//! process died). Broadcast, all-gather and barrier go over the TCP ring that bootstrapped the
//! gang; they carry little data.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use tch::{Device, Kind, Tensor};

use super::shm_setup::{check_one_host, map_gang_file, map_peer_buffers, unavailable};
use super::tcp::cpu_bytes_mut;
use super::{Collective, CollectiveError, ReduceOp, TcpCollective};

/// Bytes of one rank's staging slot. The gang file holds `2 × world` of them, so eight ranks fit
/// in the 64 MiB `/dev/shm` a Docker container gets by default.
pub const DEFAULT_SLOT_BYTES: usize = 1 << 20;
/// Control line of one rank: two cache lines, so ranks never write the same line.
const LINE: usize = 128;
/// Elements summed per block: the block's running sum stays in L1.
const BLOCK: usize = 2048;

/// A rank's control line: its barrier counter and the operation it is in.
#[repr(C)]
struct ControlLine {
    arrived: AtomicU64,
    /// seq, kind, element count, offset in a shared buffer (or `u64::MAX`).
    op: [AtomicU64; 4],
}

/// The shared-memory communicator of one rank. One owner; every wait has a timeout.
pub struct ShmCollective {
    rank: usize,
    world: usize,
    tcp: TcpCollective,
    /// Control lines, then slot set 0 (one slot per rank), then slot set 1.
    gang: MmapMut,
    slot_bytes: usize,
    /// This rank's barrier counter.
    arrived: u64,
    /// Chunks staged so far; chunk `c` uses slot set `c % 2`.
    chunks: u64,
    seq: u64,
    buffers: Vec<SharedBuffer>,
    /// Set by the first failed operation: peers may be anywhere in the protocol.
    broken: Option<String>,
}

impl std::fmt::Debug for ShmCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("slot_bytes", &self.slot_bytes)
            .field("shared_buffers", &self.buffers.len())
            .finish()
    }
}

/// A buffer every rank mapped: the base address of each rank's copy, indexed by rank. The
/// mappings are never unmapped (tensors made over them may live anywhere in the process), so the
/// addresses stay valid for the life of the process.
struct SharedBuffer {
    bytes: usize,
    bases: Vec<usize>,
}

impl ShmCollective {
    /// Sets up shared memory for the ranks of `tcp` (a connected ring; it stays in use for
    /// broadcast, all-gather, barrier and noticing dead peers). Every rank calls this together.
    /// Fails on every rank alike when the ranks are not on one host or `/dev/shm` is too small.
    pub fn new(tcp: TcpCollective) -> Result<Self, CollectiveError> {
        Self::try_new(tcp, DEFAULT_SLOT_BYTES).map_err(|(e, _)| e)
    }

    /// [`Self::new`] with another slot size (rounded down to 64 bytes; every rank must pass the
    /// same value).
    pub fn with_slot_bytes(tcp: TcpCollective, slot_bytes: usize) -> Result<Self, CollectiveError> {
        Self::try_new(tcp, slot_bytes).map_err(|(e, _)| e)
    }

    /// [`Self::with_slot_bytes`], handing `tcp` back on failure. Every rank fails alike with
    /// [`CollectiveError::Unavailable`] when shared memory cannot be set up, and the ring is
    /// then still usable on its own.
    #[allow(clippy::result_large_err, reason = "called once per gang; the ring is handed back by value")]
    pub fn try_new(mut tcp: TcpCollective, slot_bytes: usize) -> Result<Self, (CollectiveError, TcpCollective)> {
        let (rank, world) = (tcp.rank(), tcp.world_size());
        let slot_bytes = (slot_bytes / 64).max(1) * 64;
        let len = LINE * world + 2 * world * slot_bytes;
        let gang = match check_one_host(&mut tcp).and_then(|()| {
            if world == 1 {
                MmapMut::map_anon(len).map_err(|e| unavailable(format!("cannot map {len} bytes: {e}")))
            } else {
                map_gang_file(&mut tcp, len)
            }
        }) {
            Ok(gang) => gang,
            Err(e) => return Err((e, tcp)),
        };
        Ok(ShmCollective {
            rank,
            world,
            tcp,
            gang,
            slot_bytes,
            arrived: 0,
            chunks: 0,
            seq: 0,
            buffers: Vec::new(),
            broken: None,
        })
    }

    /// Changes the wait limit of every operation; takes effect at the next one.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.tcp.set_timeout(timeout);
    }

    /// Sums (or averages) `data` across ranks in place; every rank ends with identical bits.
    pub fn all_reduce_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        self.all_reduce_slice(data, op)
    }

    /// [`Self::all_reduce_f32`] for f64.
    pub fn all_reduce_f64(&mut self, data: &mut [f64], op: ReduceOp) -> Result<(), CollectiveError> {
        self.all_reduce_slice(data, op)
    }

    fn all_reduce_slice<T: Element>(&mut self, data: &mut [T], op: ReduceOp) -> Result<(), CollectiveError> {
        self.check_usable()?;
        self.seq += 1;
        if self.world == 1 {
            return Ok(());
        }
        let result = match self.shared_location(data.as_ptr() as usize, size_of_val(data)) {
            Some((buffer, offset)) => self.reduce_shared::<T>(buffer, offset, data.len(), op),
            None => self.reduce_staged(data, op),
        };
        if let Err(e) = &result {
            tracing::warn!(rank = self.rank, error = %e, "shm collective failed; the gang must be rebuilt");
            self.broken = Some(e.to_string());
        }
        result
    }

    /// Whether `tensor`'s memory lies in a buffer from [`Collective::shared_zeros`] of this
    /// communicator, so that all-reducing it needs no staging.
    pub fn holds(&self, tensor: &Tensor) -> bool {
        tensor.defined()
            && tensor.device() == Device::Cpu
            && self
                .shared_location(tensor.data_ptr() as usize, tensor.numel() * tensor.kind().elt_size_in_bytes())
                .is_some()
    }

    /// The shared buffer that `bytes` bytes at address `start` lie in, and their offset there.
    fn shared_location(&self, start: usize, bytes: usize) -> Option<(usize, usize)> {
        let end = start + bytes;
        self.buffers.iter().enumerate().find_map(|(i, b)| {
            let base = b.bases[self.rank];
            (start >= base && end <= base + b.bytes).then(|| (i, start - base))
        })
    }

    fn reduce_staged<T: Element>(&mut self, data: &mut [T], op: ReduceOp) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank, self.world);
        let slot_elems = self.slot_bytes / size_of::<T>();
        self.announce(T::KIND, data.len() as u64, u64::MAX);
        let mut first = true;
        for chunk in data.chunks_mut(slot_elems) {
            let set = (self.chunks % 2) as usize;
            self.chunks += 1;
            let parts = parts(chunk.len(), world);
            let slots: Vec<*mut T> = (0..world).map(|k| self.slot_ptr(set, k).cast::<T>()).collect();
            for (_, part) in parts.iter().enumerate().filter(|(k, _)| *k != rank) {
                // SAFETY: this rank's own slot holds slot_elems >= chunk.len() elements; peers
                // read it only after the next barrier.
                let mine = unsafe { std::slice::from_raw_parts_mut(slots[rank].add(part.start), part.len()) };
                mine.copy_from_slice(&chunk[part.clone()]);
            }
            self.phase("all_reduce")?;
            if first {
                self.check_peers_agree()?;
                first = false;
            }
            let mine = parts[rank].clone();
            let own = chunk[mine.clone()].as_mut_ptr();
            let inputs: Vec<*const T> = (0..world)
                .map(|k| if k == rank { own.cast_const() } else { slots[k].wrapping_add(mine.start).cast_const() })
                .collect();
            let outputs = [own, slots[rank].wrapping_add(mine.start)];
            // SAFETY: part `rank` of every slot was written before the barrier and no rank writes
            // it until the next barrier but this one; `own` is this rank's exclusive data.
            unsafe { reduce_blocks(&inputs, &outputs, mine.len(), divisor(op, world)) };
            self.phase("all_reduce")?;
            for (k, part) in parts.iter().enumerate().filter(|(k, _)| *k != rank) {
                // SAFETY: rank k wrote part k of its slot before the barrier just passed, and
                // writes that slot set again only after two more barriers.
                let sums = unsafe { std::slice::from_raw_parts(slots[k].add(part.start).cast_const(), part.len()) };
                chunk[part.clone()].copy_from_slice(sums);
            }
        }
        Ok(())
    }

    fn reduce_shared<T: Element>(
        &mut self,
        buffer: usize,
        offset: usize,
        len: usize,
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank, self.world);
        self.announce(T::KIND, len as u64, offset as u64);
        self.phase("all_reduce")?;
        self.check_peers_agree()?;
        let part = parts(len, world).swap_remove(rank);
        let at = |k: usize| (self.buffers[buffer].bases[k] + offset) as *mut T;
        let inputs: Vec<*const T> = (0..world).map(|k| at(k).wrapping_add(part.start).cast_const()).collect();
        let outputs: Vec<*mut T> = (0..world).map(|k| at(k).wrapping_add(part.start)).collect();
        // SAFETY: every rank has written its data before the barrier, and until the next one
        // only this rank touches part `rank` of the range, in every rank's buffer.
        unsafe { reduce_blocks(&inputs, &outputs, part.len(), divisor(op, world)) };
        self.phase("all_reduce")
    }

    fn slot_ptr(&mut self, set: usize, rank: usize) -> *mut u8 {
        let at = LINE * self.world + (set * self.world + rank) * self.slot_bytes;
        self.gang[at..].as_mut_ptr()
    }

    fn line(&self, rank: usize) -> &ControlLine {
        // SAFETY: the mapping starts page-aligned and holds `world` lines of LINE bytes; the
        // line is only accessed through atomics, by every process that maps the file.
        unsafe { &*self.gang.as_ptr().add(rank * LINE).cast::<ControlLine>() }
    }

    /// Publishes the operation this rank is entering, for [`Self::check_peers_agree`].
    fn announce(&self, kind: u64, len: u64, offset: u64) {
        let line = self.line(self.rank);
        for (slot, value) in line.op.iter().zip([self.seq, kind, len, offset]) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    /// After the first barrier of an operation: every rank announced the same one. A mismatch
    /// (a rank skipped a call, or passed another size) would otherwise mix unrelated memory.
    fn check_peers_agree(&self) -> Result<(), CollectiveError> {
        let read = |k: usize| -> [u64; 4] { std::array::from_fn(|i| self.line(k).op[i].load(Ordering::Relaxed)) };
        let mine = read(self.rank);
        match (0..self.world).find(|&k| read(k) != mine) {
            None => Ok(()),
            Some(k) => Err(CollectiveError::Unsupported {
                op: "all_reduce",
                reason: format!(
                    "rank {k} is in another operation (seq, kind, elements, offset = {:?}) than rank {} ({mine:?}): \
                     every rank must make the same collective calls in the same order",
                    read(k),
                    self.rank
                ),
            }),
        }
    }

    /// Arrives at the next barrier and waits for every rank.
    fn phase(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        self.arrived += 1;
        let target = self.arrived;
        self.line(self.rank).arrived.store(target, Ordering::Release);
        let started = Instant::now();
        let timeout = self.tcp.timeout();
        let mut polls = 0u32;
        loop {
            let lagging = (0..self.world).find(|&k| self.line(k).arrived.load(Ordering::Acquire) < target);
            let Some(peer) = lagging else {
                return Ok(());
            };
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(256) {
                if let Some(dead) = self.tcp.lost_peer() {
                    return Err(CollectiveError::Io {
                        op,
                        peer: dead,
                        source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the peer's process exited"),
                    });
                }
                if started.elapsed() > timeout {
                    return Err(CollectiveError::Timeout { op, peer, after: timeout });
                }
            }
            match polls {
                0..4096 => std::hint::spin_loop(),
                4096..4352 => std::thread::yield_now(),
                _ => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    }

    fn check_usable(&self) -> Result<(), CollectiveError> {
        match &self.broken {
            None => Ok(()),
            Some(reason) => Err(CollectiveError::Io {
                op: "all_reduce",
                peer: self.rank,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    format!("the gang's shared memory was abandoned after an earlier error: {reason}"),
                ),
            }),
        }
    }
}

impl Collective for ShmCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError> {
        let kind = tensor.f_kind();
        // SAFETY: `tensor` is borrowed mutably for the whole call.
        let bytes = unsafe { cpu_bytes_mut("all_reduce", tensor) }?;
        match kind {
            // SAFETY (both): a CPU tensor's storage is aligned for its element type.
            Ok(Kind::Float) => self.all_reduce_slice(unsafe { cast_slice::<f32>(bytes) }, op),
            Ok(Kind::Double) => self.all_reduce_slice(unsafe { cast_slice::<f64>(bytes) }, op),
            other => Err(CollectiveError::Unsupported {
                op: "all_reduce",
                reason: format!("the shm backend reduces f32 and f64 tensors, got {other:?}"),
            }),
        }
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.tcp.broadcast(tensor, root)
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        self.tcp.all_gather(input)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.tcp.barrier()
    }

    fn shared_zeros(&mut self, numel: i64, kind: Kind) -> Result<Option<Tensor>, CollectiveError> {
        if self.world == 1 || !matches!(kind, Kind::Float | Kind::Double) || numel <= 0 {
            return Ok(None);
        }
        let bytes = numel as usize * kind.elt_size_in_bytes();
        let Some(bases) = map_peer_buffers(&mut self.tcp, bytes)? else {
            return Ok(None);
        };
        let base = bases[self.rank];
        self.buffers.push(SharedBuffer { bytes, bases });
        // SAFETY: `base` is a zero-filled mapping of `bytes` bytes that is never unmapped.
        let tensor = unsafe { Tensor::f_from_blob(base as *const u8, &[numel], &[1], kind, Device::Cpu) }
            .map_err(|e| unavailable(format!("cannot wrap the shared buffer in a tensor: {e}")))?;
        Ok(Some(tensor))
    }
}

/// f32 and f64, the element types the backend sums.
trait Element: Copy + std::ops::AddAssign + std::ops::Div<Output = Self> + Default {
    const KIND: u64;
    fn from_usize(n: usize) -> Self;
}

impl Element for f32 {
    const KIND: u64 = 1;
    fn from_usize(n: usize) -> Self {
        n as f32
    }
}

impl Element for f64 {
    const KIND: u64 = 2;
    fn from_usize(n: usize) -> Self {
        n as f64
    }
}

fn divisor<T: Element>(op: ReduceOp, world: usize) -> Option<T> {
    match op {
        ReduceOp::Sum => None,
        ReduceOp::Avg => Some(T::from_usize(world)),
    }
}

/// `outputs[j][i] = (inputs[0][i] + inputs[1][i] + ...) / divisor` for `i < len`, in blocks.
/// An output may be one of the inputs: each block is read completely before it is written.
///
/// # Safety
/// Every pointer must be valid for `len` elements, and no other thread may write them meanwhile.
unsafe fn reduce_blocks<T: Element>(inputs: &[*const T], outputs: &[*mut T], len: usize, divisor: Option<T>) {
    let mut sum = [T::default(); BLOCK];
    let mut start = 0;
    while start < len {
        let n = BLOCK.min(len - start);
        let acc = &mut sum[..n];
        // SAFETY (all blocks below): within the caller's `len` elements of each pointer.
        acc.copy_from_slice(unsafe { std::slice::from_raw_parts(inputs[0].add(start), n) });
        for input in &inputs[1..] {
            let x = unsafe { std::slice::from_raw_parts(input.add(start), n) };
            for (a, b) in acc.iter_mut().zip(x) {
                *a += *b;
            }
        }
        if let Some(d) = divisor {
            for a in acc.iter_mut() {
                *a = *a / d;
            }
        }
        for out in outputs {
            unsafe { std::slice::from_raw_parts_mut(out.add(start), n) }.copy_from_slice(acc);
        }
        start += n;
    }
}

/// `len` elements split into `world` contiguous parts, as even as possible; part `r` is rank r's.
fn parts(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world).map(|r| (len * r / world)..(len * (r + 1) / world)).collect()
}

/// # Safety
/// `bytes` must be aligned for `T` (it is: it comes from a tensor of element type `T`).
unsafe fn cast_slice<T>(bytes: &mut [u8]) -> &mut [T] {
    debug_assert_eq!(bytes.as_ptr() as usize % align_of::<T>(), 0);
    // SAFETY: aligned per the caller; f32/f64 accept any bit pattern.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_range_in_order() {
        for (len, world) in [(10, 3), (0, 2), (1, 4), (1 << 20, 2), (7, 7)] {
            let p = parts(len, world);
            assert_eq!(p.len(), world);
            assert_eq!(p[0].start, 0);
            assert_eq!(p[world - 1].end, len);
            for w in p.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
        }
    }

    #[test]
    fn blocks_sum_in_rank_order_and_divide() {
        let a: Vec<f32> = (0..5000).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..5000).map(|i| 0.5 * i as f32).collect();
        let mut out = a.clone();
        let outputs = [out.as_mut_ptr()];
        // SAFETY: every pointer covers 5000 elements.
        unsafe { reduce_blocks(&[a.as_ptr(), b.as_ptr()], &outputs, 5000, Some(2.0f32)) };
        for i in 0..5000 {
            assert_eq!(out[i], (a[i] + b[i]) / 2.0);
        }
    }
}
