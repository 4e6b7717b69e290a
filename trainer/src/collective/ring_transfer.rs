//! Runs a [`Schedule`] over a rank's two ring sockets: a sender thread writes to the successor
//! while the calling thread reads from the predecessor and reduces, segment by segment, so
//! receiving, reducing and sending overlap.
//!
//! Every operation starts with an agreement on its [`OpDesc`] (see `ring_schedule::Agreement`).
//! Any error, a disagreement included, shuts both sockets down, so the neighbours fail at once
//! instead of waiting out their timeouts, and the communicator that owns the links is broken
//! from then on.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::CollectiveError;
use super::op_desc::{OpDesc, OpWords};
use super::ring_schedule::{Agreement, Combine, Elem, RecvStep, Schedule, SendStep};

/// Below this many bytes sent per rank, one thread alternates sends and receives: everything in
/// flight fits in the kernel's socket buffers, and a thread spawn would cost more than the data.
const INLINE_MAX_BYTES: usize = 32 * 1024;

/// A rank's two ring connections: it only writes to `next` and only reads from `prev`.
#[derive(Debug)]
pub(crate) struct RingLinks {
    pub rank: usize,
    pub next: TcpStream,
    pub prev: TcpStream,
    pub next_rank: usize,
    pub prev_rank: usize,
}

impl RingLinks {
    pub(crate) fn shutdown(&self) {
        // Best effort: the socket may already be gone.
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }
}

/// The [`OpDesc`] as it travels ahead of each collective's data (little-endian words).
const HEADER_LEN: usize = 24;

fn encode_header(desc: &OpDesc) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    for (chunk, word) in out.chunks_exact_mut(8).zip(desc.words()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

fn decode_header(raw: &[u8; HEADER_LEN]) -> OpWords {
    std::array::from_fn(|i| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&raw[i * 8..(i + 1) * 8]);
        u64::from_le_bytes(word)
    })
}

/// Where an operation runs: its name for errors, and the per-read/per-write timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpContext {
    pub op: &'static str,
    pub timeout: Duration,
}

impl OpContext {
    /// Turns a socket error into the collective's error: an expired timeout into `Timeout`, a
    /// closed or reset connection into `Io`.
    pub(crate) fn link_error(&self, peer: usize, err: io::Error) -> CollectiveError {
        match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                CollectiveError::Timeout { op: self.op, peer, after: self.timeout }
            }
            io::ErrorKind::UnexpectedEof => CollectiveError::Io {
                op: self.op,
                peer,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection"),
            },
            _ => CollectiveError::Io { op: self.op, peer, source: err },
        }
    }
}

/// Runs `schedule` on `buf` after the ranks have agreed on `desc` (see [`Agreement`]).
/// `scratch` is reused across calls.
pub(crate) fn run(
    links: &RingLinks,
    buf: &mut [u8],
    schedule: &Schedule,
    desc: OpDesc,
    scratch: &mut Vec<u64>,
    ctx: OpContext,
) -> Result<(), CollectiveError> {
    let reduce_bytes =
        schedule.recvs.iter().filter(|r| r.combine != Combine::Copy).map(|r| r.bytes.len()).max().unwrap_or(0);
    if scratch.len() * 8 < reduce_bytes {
        scratch.resize(reduce_bytes.div_ceil(8), 0);
    }
    let view = SharedBytes { ptr: buf.as_mut_ptr(), len: buf.len() };
    let scratch = SharedBytes { ptr: scratch.as_mut_ptr().cast(), len: scratch.len() * 8 };
    let result = match schedule.agreement {
        Agreement::Neighbours => transfer(links, view, schedule, Some(desc), scratch, ctx),
        Agreement::Lap { starts } => agree_in_a_lap(links, &desc, starts)
            .map_err(|(peer, e)| ctx.link_error(peer, e))
            .and_then(|()| transfer(links, view, schedule, None, scratch, ctx)),
    };
    if result.is_err() {
        links.shutdown();
    }
    result
}

fn transfer(
    links: &RingLinks,
    buf: SharedBytes,
    schedule: &Schedule,
    header: Option<OpDesc>,
    scratch: SharedBytes,
    ctx: OpContext,
) -> Result<(), CollectiveError> {
    if schedule.sent_bytes() <= INLINE_MAX_BYTES {
        run_inline(links, buf, schedule, header, scratch, ctx)
    } else {
        run_threaded(links, buf, schedule, header, scratch, ctx)
    }
}

/// The header once round the ring before any data: the starting rank sends it and waits for it
/// to come back; every other rank checks its predecessor's and only then passes its own on. A
/// returning header thus means every rank agreed. A rank that refuses closes its links: the ranks
/// after it never get the header, and the root and the ranks before it, which wait on it,
/// never get their header back or their data. Costs `world` small sequential hops.
fn agree_in_a_lap(links: &RingLinks, desc: &OpDesc, starts: bool) -> Result<(), (usize, io::Error)> {
    let send = || write_all(&links.next, &encode_header(desc)).map_err(|e| (links.next_rank, e));
    if starts {
        send()?;
    }
    read_header(links, desc).map_err(|e| (links.prev_rank, e))?;
    if !starts {
        send()?;
    }
    Ok(())
}

/// One thread, greedy order: send whenever allowed, otherwise receive. Only for small payloads.
fn run_inline(
    links: &RingLinks,
    buf: SharedBytes,
    schedule: &Schedule,
    header: Option<OpDesc>,
    scratch: SharedBytes,
    ctx: OpContext,
) -> Result<(), CollectiveError> {
    let send_err = |e| ctx.link_error(links.next_rank, e);
    let recv_err = |e| ctx.link_error(links.prev_rank, e);
    if let Some(desc) = header.filter(|_| !schedule.sends.is_empty()) {
        write_all(&links.next, &encode_header(&desc)).map_err(send_err)?;
    }
    if let Some(desc) = header.filter(|_| !schedule.recvs.is_empty()) {
        read_header(links, &desc).map_err(recv_err)?;
    }
    let (mut sent, mut received) = (0, 0);
    while sent < schedule.sends.len() || received < schedule.recvs.len() {
        match (schedule.sends.get(sent), schedule.recvs.get(received)) {
            (Some(step), _) if step.after_recvs <= received => {
                // SAFETY: one thread, no other reference into `buf` is live.
                unsafe { send_step(&links.next, buf, step) }.map_err(send_err)?;
                sent += 1;
            }
            (_, Some(step)) if step.after_sends <= sent => {
                // SAFETY: as above; `scratch` is only used here.
                unsafe { recv_step(&links.prev, buf, scratch, step) }.map_err(recv_err)?;
                received += 1;
            }
            _ => unreachable!("ring schedules never wait on themselves"),
        }
    }
    Ok(())
}

fn run_threaded(
    links: &RingLinks,
    buf: SharedBytes,
    schedule: &Schedule,
    header: Option<OpDesc>,
    scratch: SharedBytes,
    ctx: OpContext,
) -> Result<(), CollectiveError> {
    let progress = Progress::default();
    std::thread::scope(|scope| {
        let sender = std::thread::Builder::new()
            .name("rtrain-ring-send".into())
            .spawn_scoped(scope, || {
                if let Err(Stop::Failed(e)) = send_loop(links, buf, &schedule.sends, header, &progress, ctx) {
                    progress.fail(e);
                    // Unblocks the receiver if it is stuck in a read from a live but silent peer.
                    links.shutdown();
                }
            })
            .map_err(|e| CollectiveError::Io { op: ctx.op, peer: links.next_rank, source: e })?;
        if let Err(Stop::Failed(e)) = recv_loop(links, buf, scratch, &schedule.recvs, header, &progress, ctx) {
            progress.fail(e);
            // Unblocks the sender if it is stuck in a write to a live but slow peer.
            links.shutdown();
        }
        if let Err(panic) = sender.join() {
            std::panic::resume_unwind(panic);
        }
        Ok::<(), CollectiveError>(())
    })?;
    match progress.first_error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn send_loop(
    links: &RingLinks,
    buf: SharedBytes,
    sends: &[SendStep],
    header: Option<OpDesc>,
    progress: &Progress,
    ctx: OpContext,
) -> Result<(), Stop> {
    let link_err = |e| Stop::Failed(ctx.link_error(links.next_rank, e));
    if let Some(desc) = header.filter(|_| !sends.is_empty()) {
        write_all(&links.next, &encode_header(&desc)).map_err(link_err)?;
    }
    let mut received = 0;
    for (i, step) in sends.iter().enumerate() {
        if step.after_recvs > received {
            received = progress.wait(|c| c.received, step.after_recvs, links.prev_rank, ctx)?;
        }
        // SAFETY: the schedule's ordering rules keep the receiver off `step.bytes` until this
        // send is counted below.
        unsafe { send_step(&links.next, buf, step) }.map_err(link_err)?;
        progress.update(|c| c.sent = i + 1);
    }
    Ok(())
}

fn recv_loop(
    links: &RingLinks,
    buf: SharedBytes,
    scratch: SharedBytes,
    recvs: &[RecvStep],
    header: Option<OpDesc>,
    progress: &Progress,
    ctx: OpContext,
) -> Result<(), Stop> {
    let link_err = |e| Stop::Failed(ctx.link_error(links.prev_rank, e));
    if let Some(desc) = header.filter(|_| !recvs.is_empty()) {
        read_header(links, &desc).map_err(link_err)?;
    }
    let mut sent = 0;
    for (k, step) in recvs.iter().enumerate() {
        if step.after_sends > sent {
            sent = progress.wait(|c| c.sent, step.after_sends, links.next_rank, ctx)?;
        }
        // SAFETY: the sender is past every send that reads `step.bytes` (schedule invariant), and
        // `scratch` belongs to this thread alone.
        unsafe { recv_step(&links.prev, buf, scratch, step) }.map_err(link_err)?;
        progress.update(|c| c.received = k + 1);
    }
    Ok(())
}

/// # Safety
/// No live mutable reference may overlap `step.bytes` of `buf`.
unsafe fn send_step(next: &TcpStream, buf: SharedBytes, step: &SendStep) -> io::Result<()> {
    if step.bytes.is_empty() {
        return Ok(());
    }
    write_all(next, unsafe { buf.slice(step.bytes.clone()) })
}

/// # Safety
/// No other live reference may overlap `step.bytes` of `buf` or the used part of `scratch`.
unsafe fn recv_step(prev: &TcpStream, buf: SharedBytes, scratch: SharedBytes, step: &RecvStep) -> io::Result<()> {
    if step.bytes.is_empty() {
        return Ok(());
    }
    let dst = unsafe { buf.slice_mut(step.bytes.clone()) };
    match step.combine {
        Combine::Copy => read_exact(prev, dst),
        Combine::Sum(elem) => {
            let src = unsafe { scratch.slice_mut(0..dst.len()) };
            read_exact(prev, src)?;
            reduce_into(elem, dst, src, None);
            Ok(())
        }
        Combine::SumDivided(elem, divisor) => {
            let src = unsafe { scratch.slice_mut(0..dst.len()) };
            read_exact(prev, src)?;
            reduce_into(elem, dst, src, Some(divisor));
            Ok(())
        }
    }
}

/// `dst += src` (then `/ divisor`), element-wise; auto-vectorised in optimised builds.
fn reduce_into(elem: Elem, dst: &mut [u8], src: &[u8], divisor: Option<f64>) {
    match elem {
        Elem::F32 => {
            let (d, s) = (cast_mut::<f32>(dst), cast::<f32>(src));
            match divisor {
                None => d.iter_mut().zip(s).for_each(|(a, b)| *a += *b),
                Some(n) => {
                    let n = n as f32;
                    d.iter_mut().zip(s).for_each(|(a, b)| *a = (*a + *b) / n);
                }
            }
        }
        Elem::F64 => {
            let (d, s) = (cast_mut::<f64>(dst), cast::<f64>(src));
            match divisor {
                None => d.iter_mut().zip(s).for_each(|(a, b)| *a += *b),
                Some(n) => d.iter_mut().zip(s).for_each(|(a, b)| *a = (*a + *b) / n),
            }
        }
    }
}

fn cast_mut<T: Copy>(bytes: &mut [u8]) -> &mut [T] {
    // SAFETY: f32/f64 accept every bit pattern; the alignment is checked below.
    let (head, body, tail) = unsafe { bytes.align_to_mut::<T>() };
    assert!(head.is_empty() && tail.is_empty(), "ring buffers are element-aligned");
    body
}

fn cast<T: Copy>(bytes: &[u8]) -> &[T] {
    // SAFETY: as in `cast_mut`.
    let (head, body, tail) = unsafe { bytes.align_to::<T>() };
    assert!(head.is_empty() && tail.is_empty(), "ring buffers are element-aligned");
    body
}

/// Reads the predecessor's header and refuses (`InvalidData`) one that is not `expected`.
fn read_header(links: &RingLinks, expected: &OpDesc) -> io::Result<()> {
    let mut raw = [0u8; HEADER_LEN];
    read_exact(&links.prev, &mut raw)?;
    expected
        .check(decode_header(&raw), links.prev_rank, links.rank)
        .map_err(|message| io::Error::new(io::ErrorKind::InvalidData, message))
}

fn read_exact(stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut reader = stream;
    reader.read_exact(buf)
}

/// `write_all` through `send(MSG_NOSIGNAL)`: a peer that went away is an `EPIPE` error, never a
/// `SIGPIPE` that kills a host process which did not ignore it.
pub(crate) fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while !buf.is_empty() {
        // SAFETY: `buf` is a live byte slice; `fd` is an open socket owned by `stream`.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// A raw view of the operation's buffer that the sender and receiver threads share. The schedule
/// guarantees they touch disjoint ranges at any time; the view lives only for one `run` call.
#[derive(Clone, Copy)]
struct SharedBytes {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is borrowed from a `&mut [u8]` that outlives the scoped threads; disjoint
// access is the schedule's invariant (see `ring_schedule`).
unsafe impl Send for SharedBytes {}
unsafe impl Sync for SharedBytes {}

impl SharedBytes {
    /// # Safety
    /// No live mutable reference may overlap `range`.
    unsafe fn slice(&self, range: Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked), and aliasing is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// No other live reference may overlap `range`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, range: Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked), and aliasing is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// Why a loop stopped early: its own error, or the other thread's.
enum Stop {
    Failed(CollectiveError),
    Aborted,
}

#[derive(Default)]
struct Counts {
    sent: usize,
    received: usize,
    failed: bool,
}

/// Progress of the two threads of one operation; each waits on the other's count.
#[derive(Default)]
struct Progress {
    counts: Mutex<Counts>,
    changed: Condvar,
    first_error: Mutex<Option<CollectiveError>>,
}

impl Progress {
    fn update(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Waits until `count(counts) >= target`; returns the count seen. `peer` names the link the
    /// other thread is blocked on, for the timeout message.
    fn wait(&self, count: fn(&Counts) -> usize, target: usize, peer: usize, ctx: OpContext) -> Result<usize, Stop> {
        let guard = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, timed_out) = self
            .changed
            .wait_timeout_while(guard, ctx.timeout, |c| !c.failed && count(c) < target)
            .unwrap_or_else(PoisonError::into_inner);
        if guard.failed {
            return Err(Stop::Aborted);
        }
        if timed_out.timed_out() {
            return Err(Stop::Failed(CollectiveError::Timeout { op: ctx.op, peer, after: ctx.timeout }));
        }
        Ok(count(&guard))
    }

    /// Records the first error and wakes the other thread so it stops too.
    fn fail(&self, err: CollectiveError) {
        let mut first = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(err);
        }
        drop(first);
        self.update(|c| c.failed = true);
    }
}
