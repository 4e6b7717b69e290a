//! The libtorch calls tch does not offer, from `csrc/torch_extras.cpp` (built by `build.rs`
//! against the same libtorch): autocast for a chosen device and dtype, TF32, and setting a
//! variable's `.grad`. Each entry point catches C++ exceptions and hands back their text.

use std::ffi::{CStr, c_char, c_int};

use tch::Tensor;

pub(crate) mod ffi {
    use std::ffi::{c_char, c_int};

    use torch_sys::C_tensor;

    unsafe extern "C" {
        pub fn rtrain_autocast_enter(
            cuda: c_int,
            prev_enabled: *mut c_int,
            prev_dtype: *mut c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn rtrain_autocast_exit(
            cuda: c_int,
            prev_enabled: c_int,
            prev_dtype: c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn rtrain_set_tf32(allow: c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn rtrain_tf32_allowed(allowed: *mut c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn rtrain_set_grad(var: *mut C_tensor, grad: *const C_tensor, err: *mut c_char, len: usize) -> c_int;
    }
}

/// Runs an entry point with a buffer for its error text; returns that text when it fails.
pub(crate) fn call(entry: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = [0 as c_char; 512];
    if entry(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the entry points NUL-terminate what they write within the buffer, which starts zeroed.
    let text = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(text.to_string_lossy().into_owned())
}

/// Makes `grad` the `.grad` of `var` (same shape, dtype and device, or an error): backward then
/// adds into it in place, so it may be a view of a flat buffer.
pub fn set_grad(var: &mut Tensor, grad: &Tensor) -> Result<(), String> {
    let (var, grad) = (var.as_mut_ptr(), grad.as_ptr());
    // SAFETY: both pointers are live tch tensors for the call; the entry point checks the match
    // and catches every C++ exception.
    call(|err, len| unsafe { ffi::rtrain_set_grad(var, grad, err, len) })
}
