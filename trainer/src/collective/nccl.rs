//! `nccl`: CUDA tensors through NCCL, loaded at run time (builds without CUDA; see [`nccl_lib`]).
//!
//! Operations run on a stream of their own, after the work enqueued so far on the legacy default
//! stream (the one libtorch uses unless told otherwise): an event recorded there orders them after
//! the kernels that wrote their tensors, while kernels enqueued later (the rest of backward, when
//! DDP all-reduces a bucket from another thread) run beside them. Each call returns once its own
//! stream is done, so work enqueued after it sees the result. CPU tensors go through a copy on
//! the device (they are small: counts, metric sums, a batch's bytes). The communicator is
//! non-blocking: init and every call return at once and are polled (NCCL's asynchronous error,
//! then the stream) until done, an error, or the timeout, which aborts the communicator: a hung
//! peer becomes a [`CollectiveError::Timeout`] instead of a stuck worker, at init too.
//!
//! [`nccl_lib`]: super::nccl_lib

use std::ffi::c_void;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, sys as cuda};
use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use super::nccl_bootstrap::{InitReadiness, NCCL_ID_BYTES, agree_on_nccl_id};
use super::nccl_lib::{NCCL_IN_PROGRESS, NCCL_SUCCESS, NcclConfig, NcclLibrary, NcclStatus};
use super::{Collective, CollectiveError, ReduceOp};

/// An NCCL communicator for one CUDA device. One owner: every operation takes `&mut self`.
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device_index: usize,
    lib: &'static NcclLibrary,
    ctx: Arc<CudaContext>,
    /// The stream NCCL runs on (non-blocking: no implicit order with the default stream).
    stream: Arc<CudaStream>,
    /// Recorded on the default stream before each call, waited for by `stream`.
    inputs_ready: CudaEvent,
    comm: sys::ncclComm_t,
    timeout: Duration,
    /// Set when an operation failed or timed out; the communicator was aborted.
    broken: Option<String>,
    /// The last operation was a completed barrier, so no peer is inside a collective and
    /// dropping may finalize and destroy (which waits on peers) rather than abort.
    quiescent: bool,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device_index", &self.device_index)
            .field("nccl", &self.lib.path)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls do not overlap;
// `&mut self` on every call and the absence of `Sync` guarantee that. The CUDA context is bound to
// the calling thread at the start of every call.
unsafe impl Send for NcclCollective {}

/// What a rank has ready before the gang agrees to create the communicator.
struct Prepared {
    lib: &'static NcclLibrary,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    inputs_ready: CudaEvent,
    id: Option<[u8; NCCL_ID_BYTES]>,
}

impl NcclCollective {
    /// Checks that NCCL and the CUDA driver can be loaded, without touching a device.
    pub fn probe() -> Result<(), CollectiveError> {
        let unavailable = |reason: String| CollectiveError::Unavailable { backend: "nccl", reason };
        NcclLibrary::get().map_err(unavailable)?;
        // SAFETY: only tries to open the driver library under cudarc's names; calls nothing.
        if !unsafe { cuda::is_culib_present() } {
            return Err(unavailable(NO_DRIVER.into()));
        }
        Ok(())
    }

    /// Joins the NCCL communicator of `world` ranks on CUDA device `device_index`; every rank
    /// must call this. The ranks first agree over `bootstrap` (e.g. the TCP ring, spanning the
    /// same ranks): each says whether its device and NCCL are ready and rank 0 sends the NCCL
    /// id, so one rank's failure fails them all with its message (see [`agree_on_nccl_id`]).
    /// Init, and every operation afterwards, gives up after `timeout`.
    pub fn new(
        rank: usize,
        world: usize,
        device_index: usize,
        bootstrap: &mut dyn Collective,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if bootstrap.rank() != rank || bootstrap.world_size() != world {
            return Err(CollectiveError::Unsupported {
                op: "nccl init",
                reason: format!(
                    "the bootstrap collective is rank {} of {}, expected rank {rank} of {world}",
                    bootstrap.rank(),
                    bootstrap.world_size()
                ),
            });
        }
        let prepared = prepare(rank, device_index);
        let readiness: InitReadiness = prepared.as_ref().map(|p| p.id).map_err(Clone::clone);
        let id_bytes = agree_on_nccl_id(bootstrap, readiness)?;
        let Prepared { lib, ctx, stream, inputs_ready, .. } =
            prepared.map_err(|reason| CollectiveError::Unavailable { backend: "nccl", reason })?;

        let mut id = sys::ncclUniqueId { internal: [0; NCCL_ID_BYTES] };
        for (dst, src) in id.internal.iter_mut().zip(id_bytes) {
            *dst = src as _;
        }
        let mut this = NcclCollective {
            rank,
            world,
            device_index,
            lib,
            ctx,
            stream,
            inputs_ready,
            comm: std::ptr::null_mut(),
            timeout,
            broken: None,
            quiescent: false,
        };
        this.ctx
            .bind_to_thread()
            .map_err(|e| this.io_error("nccl init", format!("binding the CUDA context: {e:?}")))?;
        let mut config = NcclConfig::nonblocking();
        // SAFETY: `comm` and `config` are valid pointers for the call; the context of
        // `device_index` is current, which is the device NCCL binds the communicator to.
        let status = unsafe { (lib.comm_init_rank_config)(&mut this.comm, world as i32, id, rank as i32, &mut config) };
        if status != NCCL_SUCCESS && status != NCCL_IN_PROGRESS {
            let reason = format!("ncclCommInitRankConfig: {}", lib.describe(status, this.comm));
            return Err(this.fail("nccl init", reason));
        }
        // Bounded: every rank voted ready, but one may still die before joining.
        this.wait("nccl init", false)?;
        tracing::debug!(rank, world, device_index, nccl = %lib.version_text(), "nccl communicator ready");
        Ok(this)
    }

    /// The limit on one operation, from enqueue to completion on the device.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Checks the tensor and returns its device pointer and size in bytes.
    fn device_buffer(&self, op: &'static str, tensor: &Tensor) -> Result<(*mut c_void, usize), CollectiveError> {
        let unsupported = |reason: String| CollectiveError::Unsupported { op, reason };
        match tensor.device() {
            Device::Cuda(i) if i == self.device_index => {}
            other => {
                return Err(unsupported(format!(
                    "the tensor is on {other:?}; this nccl communicator uses Cuda({})",
                    self.device_index
                )));
            }
        }
        if !tensor.is_contiguous() {
            return Err(unsupported("the tensor is not contiguous; pass tensor.contiguous()".into()));
        }
        let kind = tensor.f_kind().map_err(|e| unsupported(e.to_string()))?;
        Ok((tensor.data_ptr(), tensor.numel() * kind.elt_size_in_bytes()))
    }

    /// Runs `call` on a copy of the CPU `tensor` on this communicator's device, then copies the
    /// result back: the small CPU tensors of bookkeeping (counts, sums of metrics, a rollout
    /// batch's bytes) go through NCCL as they go through the CPU backends.
    fn through_device(
        &mut self,
        op: &'static str,
        tensor: &mut Tensor,
        call: impl FnOnce(&mut Self, &mut Tensor) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let torch_err = |e: tch::TchError| CollectiveError::Unsupported { op, reason: e.to_string() };
        let mut on_device = tensor.f_to_device(Device::Cuda(self.device_index)).map_err(torch_err)?;
        call(self, &mut on_device)?;
        tch::no_grad(|| tensor.f_copy_(&on_device)).map(|_| ()).map_err(torch_err)
    }

    /// Runs one NCCL call on the communicator's stream, after the work enqueued so far on the
    /// default stream, and waits for it within the timeout.
    fn run(
        &mut self,
        op: &'static str,
        enqueue: impl FnOnce(&NcclLibrary, sys::ncclComm_t, sys::cudaStream_t) -> NcclStatus,
    ) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.broken {
            return Err(self.io_error(op, format!("the communicator was aborted by an earlier error: {reason}")));
        }
        self.quiescent = false;
        self.ctx.bind_to_thread().map_err(|e| self.io_error(op, format!("binding the CUDA context: {e:?}")))?;
        let default_stream = self.ctx.default_stream();
        self.inputs_ready
            .record(&default_stream)
            .and_then(|()| self.stream.wait(&self.inputs_ready))
            .map_err(|e| self.io_error(op, format!("ordering after the default stream: {e:?}")))?;
        let status = enqueue(self.lib, self.comm, self.stream.cu_stream() as sys::cudaStream_t);
        // A non-blocking communicator may still be setting up connections: in progress.
        if status != NCCL_SUCCESS && status != NCCL_IN_PROGRESS {
            let reason = self.lib.describe(status, self.comm);
            return Err(self.fail(op, reason));
        }
        self.wait(op, true)
    }

    /// Polls until NCCL has no call in progress and (with `stream`) the communicator's stream has
    /// run the enqueued work, NCCL reports an error, or the timeout passes; the last two abort the
    /// communicator. Sync point.
    fn wait(&mut self, op: &'static str, stream: bool) -> Result<(), CollectiveError> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            let mut async_status: NcclStatus = NCCL_SUCCESS;
            // SAFETY: `comm` is a live communicator owned by `self`.
            let queried = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut async_status) };
            if queried != NCCL_SUCCESS {
                let reason = format!("ncclCommGetAsyncError: {}", self.lib.describe(queried, self.comm));
                return Err(self.fail(op, reason));
            }
            match async_status {
                NCCL_IN_PROGRESS => {}
                NCCL_SUCCESS if !stream => return Ok(()),
                // SAFETY: the stream belongs to the current context and lives as long as `self`;
                // cuStreamQuery was resolved (and so cannot panic) in `prepare`.
                NCCL_SUCCESS => match unsafe { cuda::cuStreamQuery(self.stream.cu_stream()) } {
                    cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                    cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                    other => return Err(self.fail(op, format!("CUDA stream error {other:?}"))),
                },
                error => {
                    let reason = format!("NCCL asynchronous error: {}", self.lib.describe(error, self.comm));
                    return Err(self.fail(op, reason));
                }
            }
            if start.elapsed() > self.timeout {
                self.abort();
                self.broken = Some(format!("{op} timed out after {:?}", self.timeout));
                let peer = (self.rank + 1) % self.world;
                return Err(CollectiveError::Timeout { op, peer, after: self.timeout });
            }
            polls += 1;
            if polls < 1_000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    fn fail(&mut self, op: &'static str, reason: String) -> CollectiveError {
        self.abort();
        self.broken = Some(reason.clone());
        self.io_error(op, reason)
    }

    /// Frees the communicator without waiting for peers or pending work: the way out of a hung
    /// or failed collective.
    fn abort(&mut self) {
        if self.broken.is_none() {
            self.broken = Some("aborted".into());
        }
        if !self.comm.is_null() {
            // SAFETY: `comm` is live and owned by `self`; it is not used after this.
            let _ = unsafe { (self.lib.comm_abort)(self.comm) };
            self.comm = std::ptr::null_mut();
        }
    }

    /// NCCL does not say which peer failed; `peer` is this rank's ring successor.
    fn io_error(&self, op: &'static str, reason: String) -> CollectiveError {
        CollectiveError::Io { op, peer: (self.rank + 1) % self.world, source: io::Error::other(reason) }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // After a completed barrier every peer is finalizing too, so the orderly teardown
        // (finalize, polled within the timeout, then destroy) cannot hang. On any other exit
        // (an error, a panic) peers may be stuck in a collective and only abort is safe.
        if self.quiescent && self.broken.is_none() && !std::thread::panicking() {
            // SAFETY: `comm` is live, idle (every call waited for its work) and owned by `self`.
            let status = unsafe { (self.lib.comm_finalize)(self.comm) };
            if (status == NCCL_SUCCESS || status == NCCL_IN_PROGRESS) && self.wait("finalize", false).is_ok() {
                // SAFETY: finalized and not used after this.
                let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
                self.comm = std::ptr::null_mut();
                return;
            }
        }
        self.abort();
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError> {
        if tensor.device() == Device::Cpu {
            return self.through_device("all_reduce", tensor, |this, t| this.all_reduce(t, op));
        }
        let (ptr, _) = self.device_buffer("all_reduce", tensor)?;
        let dtype = nccl_dtype(tensor.kind()).ok_or_else(|| CollectiveError::Unsupported {
            op: "all_reduce",
            reason: format!("NCCL cannot reduce {:?} tensors", tensor.kind()),
        })?;
        let red = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        };
        let count = tensor.numel();
        self.run("all_reduce", |lib, comm, stream| {
            // SAFETY: `ptr` addresses `count` elements of `dtype` on this communicator's device,
            // and `tensor` stays borrowed until the stream has finished.
            unsafe { (lib.all_reduce)(ptr, ptr, count, dtype, red, comm, stream) }
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Unsupported {
                op: "broadcast",
                reason: format!("root {root} is outside a world of {}", self.world),
            });
        }
        if tensor.device() == Device::Cpu {
            return self.through_device("broadcast", tensor, |this, t| this.broadcast(t, root));
        }
        let (ptr, bytes) = self.device_buffer("broadcast", tensor)?;
        self.run("broadcast", |lib, comm, stream| {
            // SAFETY: `ptr` addresses `bytes` bytes on this communicator's device.
            unsafe { (lib.broadcast)(ptr, ptr, bytes, sys::ncclDataType_t::ncclUint8, root as i32, comm, stream) }
        })
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        let torch_err = |e: tch::TchError| CollectiveError::Unsupported { op: "all_gather", reason: e.to_string() };
        if input.device() == Device::Cpu {
            let on_device = input.f_to_device(Device::Cuda(self.device_index)).map_err(torch_err)?;
            let gathered = self.all_gather(&on_device)?;
            return gathered.iter().map(|t| t.f_to_device(Device::Cpu).map_err(torch_err)).collect();
        }
        let input = input.f_contiguous().map_err(torch_err)?;
        let (send, bytes) = self.device_buffer("all_gather", &input)?;
        let options = (input.f_kind().map_err(torch_err)?, Device::Cuda(self.device_index));
        let gathered = Tensor::f_empty([(self.world * input.numel()) as i64], options).map_err(torch_err)?;
        let recv = gathered.data_ptr();
        self.run("all_gather", |lib, comm, stream| {
            // SAFETY: `send` holds `bytes` bytes and `recv` `world * bytes`, both on this device.
            unsafe { (lib.all_gather)(send, recv, bytes, sys::ncclDataType_t::ncclUint8, comm, stream) }
        })?;
        let mut shape = vec![self.world as i64];
        shape.extend(input.size());
        gathered.f_view(shape.as_slice()).and_then(|t| t.f_unbind(0)).map_err(torch_err)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let options = (Kind::Float, Device::Cuda(self.device_index));
        let mut token = Tensor::f_zeros([1], options)
            .map_err(|e| CollectiveError::Unsupported { op: "barrier", reason: e.to_string() })?;
        self.all_reduce(&mut token, ReduceOp::Sum)?;
        self.quiescent = true;
        Ok(())
    }
}

const NO_DRIVER: &str = "backend nccl needs a CUDA GPU, but the NVIDIA driver library (libcuda.so.1) cannot be \
                         loaded; use backend tcp on CPU";

/// Everything this rank can check alone before the gang agrees: NCCL loads, libtorch has CUDA and
/// the device, the driver answers, and (rank 0) the NCCL id. The error is the message every rank
/// will report.
fn prepare(rank: usize, device_index: usize) -> Result<Prepared, String> {
    // First: libtorch's CUDA backend loads the NCCL it was built with, which NcclLibrary prefers.
    crate::cuda::require_cuda(device_index).map_err(|e| e.to_string())?;
    let lib = NcclLibrary::get()?;
    // SAFETY: only tries to open the driver library under cudarc's names; calls nothing.
    if !unsafe { cuda::is_culib_present() } {
        return Err(NO_DRIVER.into());
    }
    // cudarc resolves each driver symbol on its first call and panics when the driver lacks it
    // (one older than its CUDA 13 bindings); every symbol used later is resolved here.
    type Device = (Arc<CudaContext>, Arc<CudaStream>, CudaEvent);
    let (ctx, stream, inputs_ready) = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Device, String> {
        let device_error = |e| format!("CUDA device {device_index}: {e:?}");
        let ctx = CudaContext::new(device_index).map_err(device_error)?;
        let stream = ctx.new_stream().map_err(device_error)?;
        let inputs_ready = ctx.new_event(None).map_err(device_error)?;
        inputs_ready.record(&ctx.default_stream()).and_then(|()| stream.wait(&inputs_ready)).map_err(device_error)?;
        // SAFETY: the stream belongs to the context just made current.
        match unsafe { cuda::cuStreamQuery(stream.cu_stream()) } {
            cuda::CUresult::CUDA_SUCCESS | cuda::CUresult::CUDA_ERROR_NOT_READY => Ok((ctx, stream, inputs_ready)),
            other => Err(format!("CUDA device {device_index}: stream query failed with {other:?}")),
        }
    }))
    .map_err(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!(
            "the NVIDIA driver lacks what rtrain's CUDA 13 bindings call ({text}); update the driver (580 or newer)"
        )
    })??;
    let id = if rank == 0 {
        let mut id = sys::ncclUniqueId { internal: [0; NCCL_ID_BYTES] };
        // SAFETY: `id` is a valid out-pointer.
        let status = unsafe { (lib.get_unique_id)(&mut id) };
        if status != NCCL_SUCCESS {
            return Err(format!("ncclGetUniqueId: {}", lib.describe(status, std::ptr::null_mut())));
        }
        let mut bytes = [0u8; NCCL_ID_BYTES];
        for (dst, src) in bytes.iter_mut().zip(id.internal) {
            *dst = src as u8;
        }
        Some(bytes)
    } else {
        None
    };
    Ok(Prepared { lib, ctx, stream, inputs_ready, id })
}

fn nccl_dtype(kind: Kind) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t as D;
    Some(match kind {
        Kind::Float => D::ncclFloat32,
        Kind::Double => D::ncclFloat64,
        Kind::Half => D::ncclFloat16,
        Kind::BFloat16 => D::ncclBfloat16,
        Kind::Int => D::ncclInt32,
        Kind::Int64 => D::ncclInt64,
        Kind::Int8 => D::ncclInt8,
        Kind::Uint8 => D::ncclUint8,
        _ => return None,
    })
}
