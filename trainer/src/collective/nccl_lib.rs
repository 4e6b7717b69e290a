//! The NCCL library, loaded at run time by rtrain itself (types from `cudarc`'s bindings).
//!
//! cudarc 0.19 loads NCCL under the names `libnccl.so`, `libnccl.so.13`, `.12`, ... but never
//! `libnccl.so.2`, the only name the NVIDIA wheel PyTorch 2.11+cu130 uses ships; and a dlopen by
//! another name does not match a library already loaded under its SONAME. A symlink folder plus
//! `LD_LIBRARY_PATH` would need a re-exec (the loader reads the variable once, at start). So the
//! few functions used here are looked up in a handle we open ourselves, preferring the
//! `libnccl.so.2` libtorch's CUDA backend has already loaded (two NCCLs in one process would not
//! share state). A missing library or symbol is then an error with the places searched, never
//! cudarc's panic, and the version is checked before the first call.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;
use std::sync::OnceLock;

use cudarc::nccl::sys;

use crate::cuda::{SharedLibrary, torch_lib_dirs};

/// The oldest NCCL this module drives: non-blocking init, `ncclCommFinalize` and
/// `ncclCommGetAsyncError` polling as used here are settled by 2.18.
pub const MIN_VERSION: c_int = 21800;

/// `ncclResult_t` as a plain integer, so a code newer than the bindings is not an invalid enum.
pub type NcclStatus = c_int;
pub const NCCL_SUCCESS: NcclStatus = 0;
pub const NCCL_IN_PROGRESS: NcclStatus = 7;

type CommFn = unsafe extern "C" fn(sys::ncclComm_t) -> NcclStatus;

/// Entry points of one loaded NCCL.
#[derive(Debug)]
pub struct NcclLibrary {
    pub path: String,
    /// `major * 10000 + minor * 100 + patch`.
    pub version: c_int,
    pub get_unique_id: unsafe extern "C" fn(*mut sys::ncclUniqueId) -> NcclStatus,
    pub comm_init_rank_config:
        unsafe extern "C" fn(*mut sys::ncclComm_t, c_int, sys::ncclUniqueId, c_int, *mut NcclConfig) -> NcclStatus,
    pub comm_get_async_error: unsafe extern "C" fn(sys::ncclComm_t, *mut NcclStatus) -> NcclStatus,
    pub comm_finalize: CommFn,
    pub comm_destroy: CommFn,
    pub comm_abort: CommFn,
    pub all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        sys::ncclDataType_t,
        sys::ncclRedOp_t,
        sys::ncclComm_t,
        sys::cudaStream_t,
    ) -> NcclStatus,
    pub broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        sys::ncclDataType_t,
        c_int,
        sys::ncclComm_t,
        sys::cudaStream_t,
    ) -> NcclStatus,
    pub all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        sys::ncclDataType_t,
        sys::ncclComm_t,
        sys::cudaStream_t,
    ) -> NcclStatus,
    get_error_string: unsafe extern "C" fn(NcclStatus) -> *const c_char,
    get_last_error: Option<unsafe extern "C" fn(sys::ncclComm_t) -> *const c_char>,
}

impl NcclLibrary {
    /// The process's NCCL, loaded on first use; the error says where it looked and how to fix it.
    pub fn get() -> Result<&'static NcclLibrary, String> {
        static LIB: OnceLock<Result<NcclLibrary, String>> = OnceLock::new();
        LIB.get_or_init(load).as_ref().map_err(Clone::clone)
    }

    /// `ncclGetErrorString` for `status`, plus the communicator's last error text when there is one.
    pub fn describe(&self, status: NcclStatus, comm: sys::ncclComm_t) -> String {
        // SAFETY: returns a static C string for any code.
        let text = unsafe { c_text((self.get_error_string)(status)) };
        let last = match self.get_last_error {
            // SAFETY: accepts any communicator, including null; returns a string it owns.
            Some(f) => unsafe { c_text(f(comm)) },
            None => String::new(),
        };
        if last.is_empty() { format!("{text} (code {status})") } else { format!("{text} (code {status}): {last}") }
    }

    /// `major.minor.patch`.
    pub fn version_text(&self) -> String {
        version_text(self.version)
    }
}

fn version_text(v: c_int) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

/// Copies a C string from NCCL; empty for null.
///
/// # Safety
/// `ptr` is null or a NUL-terminated string valid for the call.
unsafe fn c_text(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: the caller guarantees a valid NUL-terminated string.
    unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
}

/// Where NCCL may be, best first.
fn candidates() -> Vec<String> {
    let mut list = Vec::new();
    for dir in torch_lib_dirs() {
        // The NVIDIA wheel's folder beside torch/ in site-packages, as libtorch_cuda.so's rpath
        // ($ORIGIN/../../nvidia/nccl/lib) names it.
        if let Some(site_packages) = dir.parent().and_then(Path::parent) {
            list.push(site_packages.join("nvidia/nccl/lib/libnccl.so.2").to_string_lossy().into_owned());
        }
    }
    list.extend(["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
    list
}

fn load() -> Result<NcclLibrary, String> {
    let mut tried = Vec::new();
    // The NCCL libtorch's CUDA backend uses, when it is loaded.
    let mut found = SharedLibrary::loaded("libnccl.so.2").ok().map(|lib| (lib, "libnccl.so.2".to_string()));
    if found.is_none() {
        for name in candidates() {
            match SharedLibrary::open(&name, libc::RTLD_NOW | libc::RTLD_LOCAL) {
                Ok(lib) => {
                    found = Some((lib, name));
                    break;
                }
                Err(e) => tried.push(e),
            }
        }
    }
    let Some((lib, name)) = found else {
        return Err(format!(
            "NCCL cannot be loaded; install PyTorch 2.11 with CUDA (it brings \
             nvidia-nccl-cu13) or put libnccl.so.2 on LD_LIBRARY_PATH; use backend tcp on CPU (looked for \
             libnccl.so.2 loaded by libtorch, then: {})",
            tried.join("; ")
        ));
    };
    let path = lib.path().map_or(name, |p| p.display().to_string());
    let missing = |symbol: &str| format!("{path} is not a usable NCCL: it has no {symbol}; use NCCL 2.18 or newer");
    macro_rules! symbol {
        ($name:literal, $ty:ty) => {{
            let ptr = lib.symbol($name).ok_or_else(|| missing($name))?;
            // SAFETY: NCCL's exported function of this name has this signature (nccl.h, 2.18+).
            unsafe { std::mem::transmute::<*mut c_void, $ty>(ptr) }
        }};
    }
    let get_version = symbol!("ncclGetVersion", unsafe extern "C" fn(*mut c_int) -> NcclStatus);
    let mut version: c_int = 0;
    // SAFETY: a valid out-pointer; ncclGetVersion needs no initialisation.
    if unsafe { get_version(&mut version) } != NCCL_SUCCESS || version < MIN_VERSION {
        return Err(format!(
            "{path} is NCCL {}, and rtrain needs {} or newer; install a newer NCCL (PyTorch 2.11+cu130 brings one)",
            version_text(version),
            version_text(MIN_VERSION)
        ));
    }
    Ok(NcclLibrary {
        version,
        get_unique_id: symbol!("ncclGetUniqueId", unsafe extern "C" fn(*mut sys::ncclUniqueId) -> NcclStatus),
        comm_init_rank_config: symbol!(
            "ncclCommInitRankConfig",
            unsafe extern "C" fn(*mut sys::ncclComm_t, c_int, sys::ncclUniqueId, c_int, *mut NcclConfig) -> NcclStatus
        ),
        comm_get_async_error: symbol!(
            "ncclCommGetAsyncError",
            unsafe extern "C" fn(sys::ncclComm_t, *mut NcclStatus) -> NcclStatus
        ),
        comm_finalize: symbol!("ncclCommFinalize", CommFn),
        comm_destroy: symbol!("ncclCommDestroy", CommFn),
        comm_abort: symbol!("ncclCommAbort", CommFn),
        all_reduce: symbol!(
            "ncclAllReduce",
            unsafe extern "C" fn(
                *const c_void,
                *mut c_void,
                usize,
                sys::ncclDataType_t,
                sys::ncclRedOp_t,
                sys::ncclComm_t,
                sys::cudaStream_t,
            ) -> NcclStatus
        ),
        broadcast: symbol!(
            "ncclBroadcast",
            unsafe extern "C" fn(
                *const c_void,
                *mut c_void,
                usize,
                sys::ncclDataType_t,
                c_int,
                sys::ncclComm_t,
                sys::cudaStream_t,
            ) -> NcclStatus
        ),
        all_gather: symbol!(
            "ncclAllGather",
            unsafe extern "C" fn(
                *const c_void,
                *mut c_void,
                usize,
                sys::ncclDataType_t,
                sys::ncclComm_t,
                sys::cudaStream_t,
            ) -> NcclStatus
        ),
        get_error_string: symbol!("ncclGetErrorString", unsafe extern "C" fn(NcclStatus) -> *const c_char),
        get_last_error: lib.symbol("ncclGetLastError").map(|ptr| {
            // SAFETY: ncclGetLastError (2.13+) takes a communicator and returns a C string.
            unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn(sys::ncclComm_t) -> *const c_char>(ptr) }
        }),
        path,
    })
}

/// `ncclConfig_t` as NCCL 2.18 lays it out. NCCL reads a caller's config by its `size` and
/// `version` and gives the fields added later their defaults, so this older layout works with
/// every newer NCCL, whatever version cudarc's bindings were generated for.
#[repr(C)]
#[derive(Debug)]
pub struct NcclConfig {
    size: usize,
    magic: std::ffi::c_uint,
    version: std::ffi::c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

impl NcclConfig {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: init and collectives return at once
    /// (possibly `ncclInProgress`) and are polled through `ncclCommGetAsyncError`.
    pub fn nonblocking() -> Self {
        const UNDEF_INT: c_int = c_int::MIN;
        NcclConfig {
            size: std::mem::size_of::<NcclConfig>(),
            magic: 0xcafe_beef,
            version: MIN_VERSION as std::ffi::c_uint,
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_loads_or_says_where_it_looked() {
        match NcclLibrary::get() {
            Ok(lib) => assert!(lib.version >= MIN_VERSION, "{}", lib.version_text()),
            Err(e) => {
                assert!(e.contains("libnccl.so.2") && e.contains("use backend tcp on CPU"), "{e}");
                assert!(!e.contains("/../"), "paths are shown without detours: {e}");
            }
        }
    }

    #[test]
    fn config_has_the_nccl_2_18_layout() {
        // nccl.h 2.18: size_t, 2 x unsigned, 4 x int, const char *, int; 8-byte alignment.
        assert_eq!(std::mem::size_of::<NcclConfig>(), 48);
        assert_eq!(std::mem::offset_of!(NcclConfig, net_name), 32);
        let config = NcclConfig::nonblocking();
        assert_eq!((config.size, config.magic, config.blocking), (48, 0xcafe_beef, 0));
        assert_eq!(version_text(22_803), "2.28.3");
    }
}
