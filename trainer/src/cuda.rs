//! Makes libtorch's CUDA backend available to a process that asks for a GPU.
//!
//! `rtrain-worker` is linked against the CPU parts of libtorch only (torch-sys adds
//! `libtorch_cuda.so` only when the build machine's libtorch has it, and the linker drops the
//! unused `libtorch.so`). libtorch resolves its CUDA hooks once, on the first call that asks for
//! them (`tch::manual_seed` already does), and answers "no CUDA" for good when `libtorch_cuda.so`
//! is not loaded by then. So a process that wants a GPU calls [`require_cuda`] before any other
//! tch call: it loads `libtorch_cuda.so` from the PyTorch install beside the loaded libtorch (or
//! the one `python3` finds, or `RTRAIN_TORCH_LIB`), then checks that the device exists.

use std::ffi::{CStr, CString, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The one override of where libtorch's CUDA libraries are: a PyTorch install's `torch/lib`.
pub const TORCH_LIB_ENV: &str = "RTRAIN_TORCH_LIB";

const FIX: &str = "install the CUDA build of PyTorch 2.11 (`pip install torch==2.11.0`) or point RTRAIN_TORCH_LIB at \
                   its torch/lib folder; use device cpu (no --cuda, train.device = \"cpu\") without a GPU";

/// Why a GPU that was asked for cannot be used. A fact of the machine or its install, never
/// fixed by retrying.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CudaError {
    /// No `libtorch_cuda.so` could be loaded: `tried` lists each candidate and why it failed.
    #[error("a CUDA device was requested, but libtorch's CUDA backend (libtorch_cuda.so) cannot be loaded ({}); {FIX}", tried.join("; "))]
    NoTorchCuda { tried: Vec<String> },
    /// libtorch's CUDA backend is loaded but finds no usable GPU.
    #[error("libtorch's CUDA backend is loaded from {}, but it finds no usable GPU: {driver}; CUDA_VISIBLE_DEVICES={visible}", lib.display())]
    NoDevice { lib: PathBuf, driver: String, visible: String },
    /// The device index is past the visible devices.
    #[error("CUDA device {index} was requested, but only {count} are visible (CUDA_VISIBLE_DEVICES={visible})")]
    NoSuchDevice { index: usize, count: usize, visible: String },
}

/// Loads libtorch's CUDA backend (once per process) and checks that CUDA device `index` exists.
/// Call it before any other tch call when a GPU is wanted; see the module comment.
pub fn require_cuda(index: usize) -> Result<(), CudaError> {
    static LOADED: OnceLock<Result<PathBuf, CudaError>> = OnceLock::new();
    let lib = LOADED.get_or_init(load_torch_cuda).clone()?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into());
    if !tch::Cuda::is_available() {
        return Err(CudaError::NoDevice { lib, driver: driver_summary(), visible });
    }
    let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    if index >= count {
        return Err(CudaError::NoSuchDevice { index, count, visible });
    }
    Ok(())
}

/// Folders that may hold a PyTorch install's `torch/lib`, best first: `RTRAIN_TORCH_LIB` alone
/// when it is set; otherwise the folder of the loaded `libtorch_cpu.so` (the exact build the
/// binary runs with), then the `torch` package `python3` finds.
pub fn torch_lib_dirs() -> Vec<PathBuf> {
    torch_lib_search().0
}

/// [`torch_lib_dirs`], and a note when `python3` finds no `torch` package.
fn torch_lib_search() -> (Vec<PathBuf>, Option<String>) {
    if let Some(dir) = std::env::var_os(TORCH_LIB_ENV) {
        return (vec![PathBuf::from(dir)], None);
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = loaded_library_dir(&maps, "libtorch_cpu.so").into_iter().collect();
    match python_torch_lib() {
        Some(dir) if !dirs.contains(&dir) => dirs.push(dir),
        Some(_) => {}
        None => return (dirs, Some("python3 finds no torch package".into())),
    }
    (dirs, None)
}

/// The folder of the mapped library whose file name is `name`, from `/proc/self/maps` text.
pub fn loaded_library_dir(maps: &str, name: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(Path::new)
        .find(|path| path.file_name().is_some_and(|f| f == name))
        .and_then(|path| path.parent().map(Path::to_path_buf))
}

/// `torch/lib` of the `torch` package `python3` would import, found without importing it
/// (an import takes seconds and initialises CUDA).
fn python_torch_lib() -> Option<PathBuf> {
    let script =
        "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')";
    let out = std::process::Command::new("python3").args(["-c", script]).stderr(std::process::Stdio::null()).output();
    let out = out.ok().filter(|o| o.status.success())?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then(|| Path::new(&dir).join("lib"))
}

fn load_torch_cuda() -> Result<PathBuf, CudaError> {
    // A binary linked against a full libtorch has it already.
    if let Ok(Some(path)) = SharedLibrary::loaded("libtorch_cuda.so").map(|lib| lib.path()) {
        return Ok(path);
    }
    let (dirs, note) = torch_lib_search();
    let mut tried: Vec<String> = note.into_iter().collect();
    for dir in dirs {
        let path = dir.join("libtorch_cuda.so");
        if !path.exists() {
            tried.push(format!("{}: no such file", path.display()));
            continue;
        }
        // Global, so the CUDA operators it registers and the NVIDIA libraries it pulls in (by its
        // own rpath, from the install's nvidia/*/lib) are what every later lookup finds.
        match SharedLibrary::open(&path.to_string_lossy(), libc::RTLD_NOW | libc::RTLD_GLOBAL) {
            Ok(_) => {
                tracing::debug!(path = %path.display(), "loaded libtorch's CUDA backend");
                return Ok(path);
            }
            Err(e) => tried.push(e),
        }
    }
    Err(CudaError::NoTorchCuda { tried })
}

/// What the NVIDIA driver says about itself, for a message: the CUDA version it supports, or why
/// it cannot be asked.
fn driver_summary() -> String {
    let lib = match SharedLibrary::open("libcuda.so.1", libc::RTLD_NOW | libc::RTLD_LOCAL) {
        Ok(lib) => lib,
        Err(e) => return format!("the NVIDIA driver library cannot be loaded ({e})"),
    };
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    let Some(get) = lib.symbol("cuDriverGetVersion") else {
        return "the NVIDIA driver library has no cuDriverGetVersion".into();
    };
    // SAFETY: `cuDriverGetVersion` has this signature in every CUDA driver.
    let get: GetVersion = unsafe { std::mem::transmute::<*mut c_void, GetVersion>(get) };
    let mut version: c_int = 0;
    // SAFETY: `version` is a valid out-pointer; the call needs no cuInit.
    let status = unsafe { get(&mut version) };
    if status != 0 {
        return format!("cuDriverGetVersion failed with CUDA error {status}");
    }
    let (major, minor) = (version / 1000, version % 1000 / 10);
    if major < 13 {
        format!(
            "the NVIDIA driver supports CUDA {major}.{minor}, and PyTorch 2.11+cu130 needs 13.0 (driver 580 or newer)"
        )
    } else {
        format!("the NVIDIA driver supports CUDA {major}.{minor}, but reports no device")
    }
}

/// A shared library opened with `dlopen` and never closed: the code it holds must outlive every
/// pointer into it.
#[derive(Debug, Clone, Copy)]
pub struct SharedLibrary {
    handle: *mut c_void,
}

// SAFETY: a dlopen handle is a process-wide token; dlsym and dlinfo may be called from any thread.
unsafe impl Send for SharedLibrary {}
// SAFETY: as above; the handle is never closed, so no thread can invalidate it.
unsafe impl Sync for SharedLibrary {}

impl SharedLibrary {
    /// `dlopen(name, flags)`; a name without a slash is looked up on the library search path.
    /// The error is `dlerror`'s message.
    pub fn open(name: &str, flags: c_int) -> Result<Self, String> {
        let cname = CString::new(name).map_err(|e| format!("{name}: {e}"))?;
        // SAFETY: a valid C string; the handle is deliberately never closed.
        let handle = unsafe { libc::dlopen(cname.as_ptr(), flags) };
        if handle.is_null() { Err(dl_error(name)) } else { Ok(SharedLibrary { handle }) }
    }

    /// The library of this SONAME or path when the process has it loaded already.
    pub fn loaded(name: &str) -> Result<Self, String> {
        Self::open(name, libc::RTLD_NOW | libc::RTLD_NOLOAD)
    }

    /// The address of `name` in this library, if it defines it.
    pub fn symbol(&self, name: &str) -> Option<*mut c_void> {
        let cname = CString::new(name).ok()?;
        // SAFETY: `handle` is a live dlopen handle and `cname` a valid C string.
        let ptr = unsafe { libc::dlsym(self.handle, cname.as_ptr()) };
        (!ptr.is_null()).then_some(ptr)
    }

    /// The file this library was loaded from.
    pub fn path(&self) -> Option<PathBuf> {
        /// The leading fields of glibc's `struct link_map` (<link.h>), the only ones read.
        #[repr(C)]
        struct LinkMap {
            l_addr: usize,
            l_name: *const std::ffi::c_char,
        }
        let mut map: *mut LinkMap = std::ptr::null_mut();
        // SAFETY: RTLD_DI_LINKMAP writes a `struct link_map *` for a live handle.
        let status = unsafe { libc::dlinfo(self.handle, libc::RTLD_DI_LINKMAP, (&raw mut map).cast::<c_void>()) };
        if status != 0 || map.is_null() {
            return None;
        }
        // SAFETY: the loader owns `map` for as long as the library stays loaded (forever here),
        // and `l_name` is a NUL-terminated path.
        let name = unsafe { (*map).l_name };
        if name.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, owned by the loader.
        let text = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        (!text.is_empty()).then(|| PathBuf::from(text))
    }
}

fn dl_error(name: &str) -> String {
    // SAFETY: dlerror returns null or a C string owned by the loader, valid until the next dl call.
    let err = unsafe { libc::dlerror() };
    if err.is_null() {
        return format!("{name}: cannot be loaded");
    }
    // SAFETY: non-null C string from dlerror, copied before any other dl call.
    unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_folder_of_a_mapped_library() {
        let maps = "7f00-7f01 r-xp 00000000 08:01 42   /opt/py/site-packages/torch/lib/libtorch_cpu.so\n\
                    7f02-7f03 r--p 00000000 00:00 0    [heap]\n\
                    7f04-7f05 r-xp 00000000 08:01 43   /usr/lib/libtorch_cpu.so.bak\n";
        assert_eq!(loaded_library_dir(maps, "libtorch_cpu.so"), Some(PathBuf::from("/opt/py/site-packages/torch/lib")));
        assert_eq!(loaded_library_dir(maps, "libc10.so"), None);
    }

    #[test]
    fn a_missing_library_is_an_error_with_the_loader_message() {
        let err = SharedLibrary::open("/nonexistent/libnothing.so", libc::RTLD_NOW).unwrap_err();
        assert!(err.contains("/nonexistent/libnothing.so"), "{err}");
        assert!(SharedLibrary::loaded("libsurely-not-loaded.so.9").is_err());
    }

    #[test]
    fn the_loaded_libc_has_a_path_and_symbols() {
        let libc = SharedLibrary::loaded("libc.so.6").unwrap();
        assert!(libc.symbol("malloc").is_some());
        assert!(libc.symbol("rtrain_no_such_symbol").is_none());
        assert!(libc.path().is_some_and(|p| p.to_string_lossy().contains("libc.so.6")), "{:?}", libc.path());
    }
}
