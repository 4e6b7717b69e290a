//! The libtorch calls tch does not offer, from `csrc/torch_extras.cpp` (built by `build.rs`
//! against the same libtorch): autocast for a chosen device and dtype, TF32, setting a variable's
//! `.grad`, and a hook called once backward has accumulated a variable's gradient. Each entry point catches C++ exceptions and hands back their text.

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
        pub fn rtrain_reached_by_backward(
            root: *const C_tensor,
            vars: *const *const C_tensor,
            n: usize,
            reached: *mut u8,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn rtrain_set_ready_hook(
            var: *mut C_tensor,
            hook: Option<super::ReadyFn>,
            context: *const std::ffi::c_void,
            index: i64,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
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

/// For each of `vars`, whether backward from `root` would accumulate a gradient into it (its
/// gradient accumulator is in the graph below `root`).
pub fn reached_by_backward(root: &Tensor, vars: &[Tensor]) -> Result<Vec<bool>, String> {
    let pointers: Vec<*const torch_sys::C_tensor> = vars.iter().map(Tensor::as_ptr).collect();
    let mut reached = vec![0u8; vars.len()];
    let root = root.as_ptr();
    // SAFETY: every pointer is a live tch tensor for the call and `reached` holds `vars.len()`
    // bytes; the entry point only reads the graph and catches every C++ exception.
    call(|err, len| unsafe {
        ffi::rtrain_reached_by_backward(root, pointers.as_ptr(), pointers.len(), reached.as_mut_ptr(), err, len)
    })?;
    Ok(reached.into_iter().map(|r| r != 0).collect())
}

/// What backward calls once it has added a gradient into a variable's `.grad`: the hook's context
/// and index, as given to [`set_ready_hook`]. It runs on backward's thread and must not unwind.
pub type ReadyFn = unsafe extern "C" fn(context: *const std::ffi::c_void, index: i64);

/// Has backward call `hook(context, index)` after each accumulation into `var`'s `.grad`,
/// replacing the hook `var` had; `None` removes the hook set with this `context`, and leaves one
/// set since by another owner.
///
/// # Safety
/// `context` must stay valid for `hook` until the hook is removed or replaced, and `hook` must be
/// safe to call from any thread that runs backward.
pub unsafe fn set_ready_hook(
    var: &mut Tensor,
    hook: Option<ReadyFn>,
    context: *const std::ffi::c_void,
    index: i64,
) -> Result<(), String> {
    let var = var.as_mut_ptr();
    // SAFETY: `var` is a live tch tensor for the call; the entry point catches every C++ exception.
    call(|err, len| unsafe { ffi::rtrain_set_ready_hook(var, hook, context, index, err, len) })
}
