//! `shm`: CPU tensors between ranks on one host, through shared memory.
//!
//! The gang maps one file of `/dev/shm`, created by rank 0 and unlinked as soon as every rank has
//! it mapped (nothing is left behind, whatever happens later). It holds a header line, a control
//! line per rank and two sets of staging slots (`shm_segment`). An all-reduce works chunk by
//! chunk; for each chunk:
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
//! buffer does): all-reducing a tensor over it, or over a slice of it, skips the staging copies.
//! Rank `r` sums part `r` of every rank's buffer into every rank's buffer.
//!
//! Every operation starts with an agreement: each rank announces it on its control line (kind,
//! dtype, reduce op, root, element count, buffer offset, sequence number), and after the first
//! barrier every rank compares all announcements and refuses any difference. An announcement is
//! only overwritten after a later barrier, which no rank passes before it has checked.
//!
//! A barrier is a counter per rank: arrive by incrementing your own, then wait until every
//! counter has reached yours. Waiting spins briefly, then yields, then sleeps, and ends with an
//! error at the collective timeout, as soon as a ring neighbour's TCP connection closes (its
//! process died), or as soon as another rank has poisoned the gang. A rank that fails for any
//! reason poisons it (the header records who and why) and shuts its TCP links, so every rank
//! fails within a poll instead of at its timeout. Broadcast and all-gather move their data over
//! the TCP ring that bootstrapped the gang; they carry little.

use std::ptr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use tch::{Device, Kind, Tensor};

use super::op_desc::{DType, OpDesc, OpKind};
use super::shm_reduce::{Element, divisor, parts, reduce_blocks};
use super::shm_segment::{GangSegment, Poison, STAGED};
use super::shm_setup::{PeerBuffers, check_one_host, map_gang_file, map_peer_buffers, unavailable};
use super::tcp::{cpu_data, tensor_desc};
use super::{Collective, CollectiveError, ReduceOp, TcpCollective};

/// Bytes of one rank's staging slot. The gang file holds `2 × world` of them, so eight ranks fit
/// in the 64 MiB `/dev/shm` a Docker container gets by default.
pub const DEFAULT_SLOT_BYTES: usize = 1 << 20;

/// The shared-memory communicator of one rank. One owner; every wait has a timeout.
pub struct ShmCollective {
    rank: usize,
    world: usize,
    tcp: TcpCollective,
    gang: GangSegment,
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
            .field("slot_bytes", &self.gang.slot_bytes())
            .field("shared_buffers", &self.buffers.len())
            .finish()
    }
}

/// A buffer every rank mapped: `bytes` long, one mapping per rank (indexed by rank), never
/// unmapped (tensors over it may live anywhere in the process).
struct SharedBuffer {
    bytes: usize,
    maps: PeerBuffers,
}

impl SharedBuffer {
    fn base(&self, rank: usize) -> *mut u8 {
        self.maps[rank].as_mut_ptr()
    }
}

impl ShmCollective {
    /// Sets up shared memory for the ranks of `tcp` (a connected ring; it stays in use for
    /// broadcast, all-gather and noticing dead peers). Every rank calls this together. Fails on
    /// every rank alike when the ranks are not on one host or `/dev/shm` is too small.
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
        let len = GangSegment::len(world, slot_bytes);
        let gang = check_one_host(&mut tcp)
            .and_then(|()| {
                if world == 1 {
                    let map = MmapOptions::new().len(len).map_anon();
                    map.map(MmapRaw::from).map_err(|e| unavailable(format!("cannot map {len} bytes: {e}")))
                } else {
                    map_gang_file(&mut tcp, len)
                }
            })
            .and_then(|map| GangSegment::new(map, world, slot_bytes).map_err(unavailable));
        match gang {
            Ok(gang) => Ok(ShmCollective {
                rank,
                world,
                tcp,
                gang,
                arrived: 0,
                chunks: 0,
                seq: 0,
                buffers: Vec::new(),
                broken: None,
            }),
            Err(e) => Err((e, tcp)),
        }
    }

    /// Changes the wait limit of every operation; takes effect at the next one.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.tcp.set_timeout(timeout);
    }

    /// Sums (or averages) `data` across ranks in place; every rank ends with identical bits.
    /// Always staged through the slots, even where `data` lies in a shared buffer: a `&mut`
    /// slice promises that nobody else touches it, and in-place reduction has peers write it.
    /// All-reduce a tensor over a buffer from [`Collective::shared_zeros`] for the in-place path.
    pub fn all_reduce_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        self.all_reduce_at(data.as_mut_ptr(), data.len(), op, None)
    }

    /// [`Self::all_reduce_f32`] for f64.
    pub fn all_reduce_f64(&mut self, data: &mut [f64], op: ReduceOp) -> Result<(), CollectiveError> {
        self.all_reduce_at(data.as_mut_ptr(), data.len(), op, None)
    }

    /// Whether `tensor`'s memory lies in a buffer from [`Collective::shared_zeros`] of this
    /// communicator, so that all-reducing it needs no staging.
    pub fn holds(&self, tensor: &Tensor) -> bool {
        let Ok((start, bytes)) = cpu_data("all_reduce", tensor) else {
            return false;
        };
        bytes > 0 && self.shared_location(start as usize, bytes).is_some()
    }

    /// The shared buffer that `bytes` bytes at address `start` lie in, and their offset there.
    fn shared_location(&self, start: usize, bytes: usize) -> Option<(usize, usize)> {
        let end = start.checked_add(bytes)?;
        self.buffers.iter().enumerate().find_map(|(i, b)| {
            let base = b.base(self.rank) as usize;
            (start >= base && end <= base + b.bytes).then(|| (i, start - base))
        })
    }

    /// All-reduces `len` elements at `data`: in place when `shared` names where they lie in a
    /// shared buffer, staged otherwise. `data` must be valid for `len` elements, aligned, and
    /// touched by nothing else during the call (it may dangle when `len` is 0).
    fn all_reduce_at<T: Element>(
        &mut self,
        data: *mut T,
        len: usize,
        op: ReduceOp,
        shared: Option<(usize, usize)>,
    ) -> Result<(), CollectiveError> {
        let desc = OpDesc::new(OpKind::AllReduce, DType::Tensor(T::KIND), len).reducing(op);
        self.guarded("all_reduce", |this| match shared {
            Some((buffer, offset)) => this.reduce_shared::<T>(buffer, offset, len, desc),
            None => this.reduce_staged(data, len, desc),
        })
    }

    fn reduce_staged<T: Element>(&mut self, data: *mut T, len: usize, desc: OpDesc) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank, self.world);
        let div = divisor::<T>(desc.reduce.unwrap_or(ReduceOp::Sum), world);
        let slot_elems = self.gang.slot_bytes() / size_of::<T>();
        if len == 0 {
            return self.agree("all_reduce", desc, STAGED).and_then(|()| self.phase("all_reduce"));
        }
        self.announce(desc, STAGED);
        let mut start = 0;
        while start < len {
            let n = slot_elems.min(len - start);
            // SAFETY: start < len, within the caller's elements.
            let chunk = unsafe { data.add(start) };
            let set = (self.chunks % 2) as usize;
            self.chunks += 1;
            let parts = parts(n, world);
            let slots: Vec<*mut T> = (0..world).map(|k| self.gang.slot(set, k).cast::<T>()).collect();
            for (_, part) in parts.iter().enumerate().filter(|(k, _)| *k != rank) {
                // SAFETY: this rank's own slot holds slot_elems >= n elements and no peer reads it
                // before the next barrier; `chunk` is the caller's private memory.
                unsafe { ptr::copy_nonoverlapping(chunk.add(part.start), slots[rank].add(part.start), part.len()) };
            }
            self.phase("all_reduce")?;
            if start == 0 {
                self.check_peers_agree("all_reduce", desc, STAGED)?;
            }
            let mine = parts[rank].clone();
            // SAFETY: part `rank` of every slot was written before the barrier and no rank
            // writes it until the next barrier but this one; `chunk` is this rank's own data.
            unsafe {
                let own = chunk.add(mine.start);
                let inputs: Vec<*const T> =
                    (0..world).map(|k| if k == rank { own } else { slots[k].add(mine.start) }.cast_const()).collect();
                reduce_blocks(&inputs, &[own, slots[rank].add(mine.start)], mine.len(), div);
            }
            self.phase("all_reduce")?;
            for (k, part) in parts.iter().enumerate().filter(|(k, _)| *k != rank) {
                // SAFETY: rank k wrote part k of its slot before the barrier just passed, and
                // writes that slot set again only after two more barriers.
                unsafe { ptr::copy_nonoverlapping(slots[k].add(part.start), chunk.add(part.start), part.len()) };
            }
            start += n;
        }
        Ok(())
    }

    fn reduce_shared<T: Element>(
        &mut self,
        buffer: usize,
        offset: usize,
        len: usize,
        desc: OpDesc,
    ) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank, self.world);
        self.agree("all_reduce", desc, offset as u64)?;
        let part = parts(len, world).swap_remove(rank);
        let at = |k: usize| self.buffers[buffer].base(k).wrapping_add(offset).cast::<T>().wrapping_add(part.start);
        let inputs: Vec<*const T> = (0..world).map(|k| at(k).cast_const()).collect();
        let outputs: Vec<*mut T> = (0..world).map(at).collect();
        // SAFETY: every rank has written its data before the barrier, and until the next one
        // only this rank touches part `rank` of the range, in every rank's buffer. The range lies
        // in the buffer on every rank: they agreed on offset and length.
        unsafe { reduce_blocks(&inputs, &outputs, part.len(), divisor(desc.reduce.unwrap_or(ReduceOp::Sum), world)) };
        self.phase("all_reduce")
    }

    /// Runs one operation: refuses on a broken gang, numbers it, and on failure breaks and
    /// poisons the gang and shuts the TCP ring, so that every peer fails within a poll.
    fn guarded(
        &mut self,
        op: &'static str,
        body: impl FnOnce(&mut Self) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        self.check_usable(op)?;
        self.seq += 1;
        if self.world == 1 {
            return Ok(());
        }
        let result = body(self);
        if let Err(e) = &result {
            let why = match e {
                CollectiveError::Timeout { peer, .. } => Poison::TimedOut { peer: *peer },
                CollectiveError::Unsupported { .. } => Poison::Disagreed,
                CollectiveError::Io { peer, .. } => Poison::LostPeer { peer: *peer },
                _ => Poison::Failed,
            };
            self.gang.poison(self.rank, why);
            tracing::warn!(rank = self.rank, op, error = %e, "shm collective failed; the gang must be rebuilt");
            self.tcp.abort("the shm collective failed");
            self.broken = Some(e.to_string());
        }
        result
    }

    /// Announces `desc`, waits for every rank and refuses unless all announced the same.
    /// Sync point. The caller must pass one more barrier before its next announcement, so that
    /// this one stays readable until every rank has checked it.
    fn agree(&mut self, op: &'static str, desc: OpDesc, offset: u64) -> Result<(), CollectiveError> {
        self.announce(desc, offset);
        self.phase(op)?;
        self.check_peers_agree(op, desc, offset)
    }

    /// Publishes this rank's operation (numbered) on its control line.
    fn announce(&self, desc: OpDesc, offset: u64) {
        self.gang.announce(self.rank, desc.numbered(self.seq).words(), offset);
    }

    /// After the first barrier of an operation: every rank announced the same one. A mismatch
    /// (a skipped call, another size, op, dtype, root or buffer) would otherwise mix unrelated
    /// memory. Every rank reads every line, so either all pass or all refuse.
    fn check_peers_agree(&self, op: &'static str, desc: OpDesc, offset: u64) -> Result<(), CollectiveError> {
        let desc = desc.numbered(self.seq);
        for k in 0..self.world {
            let (words, their_offset) = self.gang.announced(k);
            desc.check(words, k, self.rank).map_err(|reason| CollectiveError::Unsupported { op, reason })?;
            if their_offset != offset {
                let place = |o: u64| if o == STAGED { "a staged buffer".to_string() } else { format!("offset {o}") };
                let reason = format!(
                    "ranks disagree: rank {k} reduces {} of its shared buffer while rank {} reduces {}; every rank \
                     must pass the same slice of the buffer from shared_zeros",
                    place(their_offset),
                    self.rank,
                    place(offset)
                );
                return Err(CollectiveError::Unsupported { op, reason });
            }
        }
        Ok(())
    }

    /// Arrives at the next barrier and waits for every rank.
    fn phase(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        self.arrived += 1;
        let target = self.arrived;
        self.gang.line(self.rank).arrived.store(target, Ordering::Release);
        let started = Instant::now();
        let timeout = self.tcp.timeout();
        let mut polls = 0u32;
        let lagging =
            |gang: &GangSegment| (0..self.world).find(|&k| gang.line(k).arrived.load(Ordering::Acquire) < target);
        loop {
            let Some(peer) = lagging(&self.gang) else {
                return Ok(());
            };
            // Only while someone lags: a rank that passed this barrier and then failed does not
            // take back its arrival.
            if let Some((by, why)) = self.gang.poisoned() {
                return Err(poisoned_error(op, by, why));
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(256) {
                if let Some(dead) = self.tcp.lost_peer() {
                    // The peer may have arrived since the check above, finished and closed its
                    // links (the last call before it exits): then this barrier is passed.
                    if lagging(&self.gang).is_none() {
                        return Ok(());
                    }
                    // A failing rank poisons the gang before it closes its links: its reason,
                    // if it left one, says more than the closed connection.
                    if let Some((by, why)) = self.gang.poisoned() {
                        return Err(poisoned_error(op, by, why));
                    }
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

    fn check_usable(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        if self.broken.is_none()
            && let Some((by, why)) = self.gang.poisoned()
        {
            self.broken = Some(poisoned_error(op, by, why).to_string());
        }
        match &self.broken {
            None => Ok(()),
            Some(reason) => Err(CollectiveError::Io {
                op,
                peer: self.rank,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    format!("the gang's shared memory was abandoned after an earlier error: {reason}"),
                ),
            }),
        }
    }
}

/// The error of a rank that finds the gang poisoned by rank `by`: it names the rank at the root
/// of the failure where that is known.
fn poisoned_error(op: &'static str, by: usize, why: Poison) -> CollectiveError {
    let (peer, message) = match why {
        Poison::LostPeer { peer } => (peer, format!("rank {by} lost its connection to rank {peer}")),
        Poison::TimedOut { peer } => (by, format!("rank {by} timed out waiting for rank {peer}")),
        Poison::Disagreed => (
            by,
            format!(
                "rank {by} found that the ranks disagree on the operation; every rank must make the same collective \
                 calls in the same order"
            ),
        ),
        Poison::Failed => (by, format!("rank {by} failed")),
    };
    CollectiveError::Io {
        op,
        peer,
        source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, format!("{message} (see its log)")),
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
        let (start, bytes) = cpu_data("all_reduce", tensor)?;
        let shared = if bytes == 0 { None } else { self.shared_location(start as usize, bytes) };
        match tensor.f_kind() {
            Ok(Kind::Float) => self.all_reduce_at(elements::<f32>(start, bytes)?, bytes / 4, op, shared),
            Ok(Kind::Double) => self.all_reduce_at(elements::<f64>(start, bytes)?, bytes / 8, op, shared),
            other => Err(CollectiveError::Unsupported {
                op: "all_reduce",
                reason: format!("the shm backend reduces f32 and f64 tensors, got {other:?}"),
            }),
        }
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        cpu_data("broadcast", tensor)?;
        let desc = tensor_desc("broadcast", OpKind::Broadcast, tensor)?.rooted(root);
        if root >= self.world {
            let reason = format!("root {root} is outside a world of {}", self.world);
            return Err(CollectiveError::Unsupported { op: "broadcast", reason });
        }
        // Agreement before data, so the root too learns of a mismatch; the ring then checks again.
        self.agreed("broadcast", desc, |tcp| tcp.broadcast(tensor, root))
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        let desc = tensor_desc("all_gather", OpKind::AllGather, input)?;
        let mut gathered = Vec::new();
        self.agreed("all_gather", desc, |tcp| tcp.all_gather(input).map(|g| gathered = g))?;
        Ok(gathered)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // The agreement is itself a barrier.
        self.agreed("barrier", OpDesc::new(OpKind::Barrier, DType::Bytes, 0), |_| Ok(()))
    }

    fn shared_zeros(&mut self, numel: i64, kind: Kind) -> Result<Option<Tensor>, CollectiveError> {
        let desc = OpDesc::new(OpKind::SharedZeros, DType::Tensor(kind), numel.max(0) as usize);
        let mut made = None;
        let world = self.world;
        self.agreed("shared_zeros", desc, |tcp| {
            if world == 1 || !matches!(kind, Kind::Float | Kind::Double) || numel <= 0 {
                return Ok(());
            }
            let bytes = numel as usize * kind.elt_size_in_bytes();
            made = map_peer_buffers(tcp, bytes)?;
            Ok(())
        })?;
        let Some(maps) = made else {
            return Ok(None);
        };
        let base = maps[self.rank].as_mut_ptr();
        let bytes = numel as usize * kind.elt_size_in_bytes();
        self.buffers.push(SharedBuffer { bytes, maps });
        // SAFETY: `base` is a zero-filled mapping of `bytes` bytes that is never unmapped.
        let tensor = unsafe { Tensor::f_from_blob(base.cast_const(), &[numel], &[1], kind, Device::Cpu) }
            .map_err(|e| unavailable(format!("cannot wrap the shared buffer in a tensor: {e}")))?;
        Ok(Some(tensor))
    }
}

impl ShmCollective {
    /// Runs `body` on the ring once every rank has announced the same `desc` (two barriers: the
    /// announcement stays until every rank has checked it). A world of one skips both.
    fn agreed(
        &mut self,
        op: &'static str,
        desc: OpDesc,
        body: impl FnOnce(&mut TcpCollective) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if self.world == 1 {
            self.check_usable(op)?;
            return body(&mut self.tcp);
        }
        self.guarded(op, |this| {
            this.agree(op, desc, STAGED)?;
            this.phase(op)?;
            body(&mut this.tcp)
        })
    }
}

/// `bytes` bytes at `start` as elements of `T`: a dangling pointer for none, an error when
/// misaligned (a CPU tensor of `T` never is).
fn elements<T>(start: *mut u8, bytes: usize) -> Result<*mut T, CollectiveError> {
    if bytes == 0 {
        return Ok(ptr::NonNull::<T>::dangling().as_ptr());
    }
    if !(start as usize).is_multiple_of(align_of::<T>()) {
        let reason = format!("the tensor's data at {start:p} is not aligned for its element type");
        return Err(CollectiveError::Unsupported { op: "all_reduce", reason });
    }
    Ok(start.cast::<T>())
}
