//! `nccl`: CUDA tensors through NCCL, loaded at run time by `cudarc` (builds without CUDA).
//!
//! Operations are enqueued on the legacy default CUDA stream, the one libtorch uses unless told
//! otherwise, so they are ordered with the surrounding tensor work. Each call then waits for the
//! stream, polling NCCL's asynchronous error, and aborts the communicator when the timeout passes:
//! a hung peer becomes a [`CollectiveError::Timeout`] instead of a stuck worker.

use std::ffi::{CStr, CString, c_void};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, sys as cuda};
use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, ReduceOp};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const NCCL_ID_BYTES: usize = 128;

/// An NCCL communicator for one CUDA device. One owner: every operation takes `&mut self`.
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device_index: usize,
    ctx: Arc<CudaContext>,
    comm: sys::ncclComm_t,
    timeout: Duration,
    /// Set when an operation failed or timed out; the communicator was aborted.
    broken: Option<String>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device_index", &self.device_index)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls do not overlap;
// `&mut self` on every call and the absence of `Sync` guarantee that. The CUDA context is bound to
// the calling thread at the start of every call.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Checks that the CUDA driver and NCCL can be loaded, without touching a device.
    pub fn probe() -> Result<(), CollectiveError> {
        probe_libraries().map_err(|reason| CollectiveError::Unavailable { backend: "nccl", reason })
    }

    /// Joins the NCCL communicator of `world` ranks on CUDA device `device_index`. Rank 0 creates
    /// the NCCL unique id and sends it through `bootstrap` (e.g. the TCP ring), which must span
    /// the same ranks; every rank must call this.
    pub fn new(
        rank: usize,
        world: usize,
        device_index: usize,
        bootstrap: &mut dyn Collective,
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
        // Every rank probes and then votes, so that a rank without NCCL fails the whole gang with
        // a clear message instead of leaving the others blocked in ncclCommInitRank.
        let local = probe_libraries();
        let id = match (&local, rank) {
            (Ok(()), 0) => result::get_uniqueid().map_err(|e| format!("ncclGetUniqueId: {}", nccl_error_text(&e))),
            (Err(reason), _) => Err(reason.clone()),
            (Ok(()), _) => Ok(sys::ncclUniqueId { internal: [0; NCCL_ID_BYTES] }),
        };
        let id = exchange_id(bootstrap, rank, id.as_ref().ok())?;
        let failures = count_failures(bootstrap, id.is_none() || local.is_err())?;
        let (Some(id), 0) = (id, failures) else {
            let reason = match local {
                Err(reason) => reason,
                Ok(()) => format!("{failures} rank(s) of the gang cannot run NCCL; use backend tcp on CPU"),
            };
            return Err(CollectiveError::Unavailable { backend: "nccl", reason });
        };

        let unavailable = |reason: String| CollectiveError::Unavailable { backend: "nccl", reason };
        let ctx =
            CudaContext::new(device_index).map_err(|e| unavailable(format!("CUDA device {device_index}: {e:?}")))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // Blocks until all `world` ranks have joined; the vote above means they are all alive.
        // SAFETY: `comm` is a valid out-pointer; the context for `device_index` is current.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| unavailable(format!("ncclCommInitRank: {}", nccl_error_text(&e))))?;
        tracing::debug!(rank, world, device_index, "nccl communicator ready");
        Ok(NcclCollective { rank, world, device_index, ctx, comm, timeout: DEFAULT_TIMEOUT, broken: None })
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

    /// Runs one NCCL call on the default stream and waits for it within the timeout.
    fn run(
        &mut self,
        op: &'static str,
        enqueue: impl FnOnce(sys::ncclComm_t) -> Result<(), result::NcclError>,
    ) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.broken {
            return Err(self.io_error(op, format!("the communicator was aborted by an earlier error: {reason}")));
        }
        self.ctx.bind_to_thread().map_err(|e| self.io_error(op, format!("binding the CUDA context: {e:?}")))?;
        if let Err(e) = enqueue(self.comm) {
            let reason = nccl_error_text(&e);
            return Err(self.fail(op, reason));
        }
        self.wait(op)
    }

    /// Polls the default stream until the enqueued work finishes, NCCL reports an error, or the
    /// timeout passes; the last two abort the communicator. Sync point.
    fn wait(&mut self, op: &'static str) -> Result<(), CollectiveError> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            // SAFETY: the null stream is the legacy default stream of the current context.
            match unsafe { cuda::cuStreamQuery(std::ptr::null_mut()) } {
                cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(self.fail(op, format!("CUDA stream error {other:?}"))),
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is a live communicator owned by `self`.
            let queried = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_error) };
            if queried != sys::ncclResult_t::ncclSuccess
                || !matches!(async_error, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress)
            {
                return Err(self.fail(op, format!("NCCL asynchronous error {async_error:?}")));
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

    fn abort(&mut self) {
        if self.broken.is_none() {
            self.broken = Some("aborted".into());
        }
        if !self.comm.is_null() {
            // SAFETY: `comm` is live; abort is the documented way out of a hung collective.
            let _ = unsafe { result::comm_abort(self.comm) };
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
        // SAFETY: `comm` is live and no operation is in flight (every call waits for its work).
        let _ = unsafe { result::comm_destroy(self.comm) };
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
        self.run("all_reduce", |comm| {
            // SAFETY: `ptr` addresses `count` elements of `dtype` on this communicator's device,
            // and `tensor` stays borrowed until the stream has finished.
            unsafe { result::all_reduce(ptr, ptr, count, dtype, red, comm, std::ptr::null_mut()) }.map(drop)
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Unsupported {
                op: "broadcast",
                reason: format!("root {root} is outside a world of {}", self.world),
            });
        }
        let (ptr, bytes) = self.device_buffer("broadcast", tensor)?;
        self.run("broadcast", |comm| {
            // SAFETY: `ptr` addresses `bytes` bytes on this communicator's device.
            unsafe {
                result::broadcast(
                    ptr,
                    ptr,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root as i32,
                    comm,
                    std::ptr::null_mut(),
                )
            }
            .map(drop)
        })
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        let torch_err = |e: tch::TchError| CollectiveError::Unsupported { op: "all_gather", reason: e.to_string() };
        let input = input.f_contiguous().map_err(torch_err)?;
        let (send, bytes) = self.device_buffer("all_gather", &input)?;
        let options = (input.f_kind().map_err(torch_err)?, Device::Cuda(self.device_index));
        let gathered = Tensor::f_empty([(self.world * input.numel()) as i64], options).map_err(torch_err)?;
        let recv = gathered.data_ptr();
        self.run("all_gather", |comm| {
            // SAFETY: `send` holds `bytes` bytes and `recv` `world * bytes`, both on this device.
            unsafe { result::all_gather(send, recv, bytes, sys::ncclDataType_t::ncclUint8, comm, std::ptr::null_mut()) }
                .map(drop)
        })?;
        let mut shape = vec![self.world as i64];
        shape.extend(input.size());
        gathered.f_view(shape.as_slice()).and_then(|t| t.f_unbind(0)).map_err(torch_err)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let options = (Kind::Float, Device::Cuda(self.device_index));
        let mut token = Tensor::f_zeros([1], options)
            .map_err(|e| CollectiveError::Unsupported { op: "barrier", reason: e.to_string() })?;
        self.all_reduce(&mut token, ReduceOp::Sum)
    }
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

/// Sends rank 0's NCCL id (or its failure) to every rank through the bootstrap collective.
/// Byte 0 says whether an id follows.
fn exchange_id(
    bootstrap: &mut dyn Collective,
    rank: usize,
    id: Option<&sys::ncclUniqueId>,
) -> Result<Option<sys::ncclUniqueId>, CollectiveError> {
    let mut payload = [0u8; NCCL_ID_BYTES + 1];
    if let (0, Some(id)) = (rank, id) {
        payload[0] = 1;
        for (dst, src) in payload[1..].iter_mut().zip(id.internal.iter()) {
            *dst = *src as u8;
        }
    }
    let mut tensor = Tensor::from_slice(&payload);
    bootstrap.broadcast(&mut tensor, 0)?;
    tensor
        .f_copy_data(&mut payload, NCCL_ID_BYTES + 1)
        .map_err(|e| CollectiveError::Unsupported { op: "nccl init", reason: e.to_string() })?;
    if payload[0] != 1 {
        return Ok(None);
    }
    let mut id = sys::ncclUniqueId { internal: [0; NCCL_ID_BYTES] };
    for (dst, src) in id.internal.iter_mut().zip(payload[1..].iter()) {
        *dst = *src as _;
    }
    Ok(Some(id))
}

/// How many ranks of the gang report a failure (sum of 0/1 votes).
fn count_failures(bootstrap: &mut dyn Collective, failed: bool) -> Result<usize, CollectiveError> {
    let mut vote = Tensor::from_slice(&[if failed { 1.0f32 } else { 0.0 }]);
    bootstrap.all_reduce(&mut vote, ReduceOp::Sum)?;
    let total = vote
        .f_double_value(&[0])
        .map_err(|e| CollectiveError::Unsupported { op: "nccl init", reason: e.to_string() })?;
    Ok(total.round() as usize)
}

/// Loads the CUDA driver and NCCL the way cudarc will, turning their absence into a message
/// (cudarc itself panics on the first call when a library is missing).
fn probe_libraries() -> Result<(), String> {
    if let Err(e) = dlopen("libcuda.so.1") {
        return Err(format!(
            "backend nccl needs a CUDA GPU, but the NVIDIA driver library cannot be loaded ({e}); use backend tcp on CPU"
        ));
    }
    let nccl = ["libnccl.so.2", "libnccl.so"].into_iter().find(|name| dlopen(name).is_ok());
    let Some(found) = nccl else {
        return Err("backend nccl needs NCCL, but neither libnccl.so.2 nor libnccl.so is on the library path \
                    (LD_LIBRARY_PATH); use backend tcp on CPU"
            .into());
    };
    // SAFETY: only tries to open the libraries cudarc would open; no symbol is called.
    let (cuda_ok, nccl_ok) = unsafe { (cuda::is_culib_present(), sys::is_culib_present()) };
    if !cuda_ok {
        return Err("the CUDA driver library loads, but not under the names cudarc looks for (libcuda.so)".into());
    }
    if !nccl_ok {
        return Err(format!(
            "NCCL is installed as {found}, but cudarc 0.19 loads it as libnccl.so: add a libnccl.so symlink to it \
             in a directory on LD_LIBRARY_PATH"
        ));
    }
    Ok(())
}

/// Opens (and keeps open) a shared library, returning `dlerror`'s message on failure.
fn dlopen(name: &str) -> Result<(), String> {
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a valid C string; the handle is intentionally leaked so the library stays loaded.
    let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns null or a valid C string owned by the loader.
    let err = unsafe { libc::dlerror() };
    if err.is_null() {
        return Err(format!("{name}: not found"));
    }
    // SAFETY: non-null C string from dlerror, copied before the next dl call.
    Err(unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned())
}

fn nccl_error_text(e: &result::NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for any result code; NCCL is loaded.
    let text = unsafe { sys::ncclGetErrorString(e.0) };
    if text.is_null() {
        return format!("{:?}", e.0);
    }
    // SAFETY: non-null, NUL-terminated, static.
    format!("{:?}: {}", e.0, unsafe { CStr::from_ptr(text) }.to_string_lossy())
}
