//! Mixed precision: bf16 autocast around forward passes, and TF32 for float32 matmuls on CUDA.
//!
//! Under `train.precision = "bf16"` the parameters, their gradients and the optimizer state stay
//! float32 (the master copy); only the forward pass runs under autocast, which casts the inputs
//! of matmul-like operators to bfloat16 and keeps reductions, softmax and losses in float32, as
//! `torch.autocast(device, dtype=torch.bfloat16)` does. Backward runs outside the region (its
//! operators follow the forward's dtypes). tch only toggles CUDA autocast in float16, so these
//! settings go through [`crate::torch_extras`].

use std::ffi::c_int;
use std::marker::PhantomData;

use tch::Device;

pub use rtrain_core::config::Precision;

use crate::torch_extras::{call, ffi};

/// A libtorch call for these settings failed; the text is libtorch's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("libtorch refused a precision setting: {0}")]
pub struct PrecisionError(String);

fn shim(entry: impl FnOnce(*mut std::ffi::c_char, usize) -> c_int) -> Result<(), PrecisionError> {
    call(entry).map_err(PrecisionError)
}

/// An autocast region: open while the guard lives, on the thread that opened it (autocast is
/// per thread, so the guard cannot leave it). Regions nest; the outermost one's end drops the
/// cached bf16 copies of the weights, so the next forward casts the updated ones.
#[must_use = "autocast is on only while the guard lives"]
#[derive(Debug)]
pub struct AutocastGuard {
    cuda: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
    _this_thread: PhantomData<*const ()>,
}

impl AutocastGuard {
    /// Opens a bf16 autocast region for the operators of `device` (CPU or CUDA).
    pub fn bf16(device: Device) -> Result<Self, PrecisionError> {
        let cuda = c_int::from(device.is_cuda());
        let (mut prev_enabled, mut prev_dtype) = (0, 0);
        // SAFETY: the out-pointers are valid for the call; the shim catches every C++ exception.
        shim(|err, len| unsafe { ffi::rtrain_autocast_enter(cuda, &mut prev_enabled, &mut prev_dtype, err, len) })?;
        Ok(Self { cuda, prev_enabled, prev_dtype, _this_thread: PhantomData })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: restores the state `bf16` saved; the shim catches every C++ exception.
        let restored = shim(|err, len| unsafe {
            ffi::rtrain_autocast_exit(self.cuda, self.prev_enabled, self.prev_dtype, err, len)
        });
        if let Err(e) = restored {
            tracing::error!(error = %e, "cannot leave an autocast region");
        }
    }
}

/// Runs `f` in the precision `precision` asks of forward passes on `device`: under bf16
/// autocast for [`Precision::Bf16`], as is for [`Precision::Fp32`].
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> Result<T, PrecisionError> {
    let _guard = match precision {
        Precision::Fp32 => None,
        Precision::Bf16 => Some(AutocastGuard::bf16(device)?),
    };
    Ok(f())
}

/// Lets float32 matmuls and convolutions on CUDA use TF32 tensor cores (10-bit mantissa, float32
/// range), or keeps them in full float32. Process-wide; no effect on CPU.
pub fn set_tf32(allow: bool) -> Result<(), PrecisionError> {
    // SAFETY: the shim catches every C++ exception.
    shim(|err, len| unsafe { ffi::rtrain_set_tf32(c_int::from(allow), err, len) })
}

/// Whether float32 matmuls on CUDA may use TF32 (libtorch's own answer).
pub fn tf32_allowed() -> Result<bool, PrecisionError> {
    let mut allowed = 0;
    // SAFETY: the out-pointer is valid for the call; the shim catches every C++ exception.
    shim(|err, len| unsafe { ffi::rtrain_tf32_allowed(&mut allowed, err, len) })?;
    Ok(allowed != 0)
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;

    #[test]
    fn bf16_autocast_runs_matmuls_in_bf16_and_ends_with_its_region() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let inside = autocast(Precision::Bf16, Device::Cpu, || a.matmul(&a)).unwrap();
        assert_eq!(inside.kind(), Kind::BFloat16);
        // Nested regions: the inner end leaves the outer one on.
        let nested = autocast(Precision::Bf16, Device::Cpu, || {
            let inner = AutocastGuard::bf16(Device::Cpu).unwrap();
            drop(inner);
            a.matmul(&a)
        })
        .unwrap();
        assert_eq!(nested.kind(), Kind::BFloat16);
        assert_eq!(a.matmul(&a).kind(), Kind::Float, "autocast outlived its region");
        let fp32 = autocast(Precision::Fp32, Device::Cpu, || a.matmul(&a)).unwrap();
        assert_eq!(fp32.kind(), Kind::Float);
    }

    #[test]
    fn autocast_keeps_losses_in_float32() {
        let logits = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([5, 5], (Kind::Float, Device::Cpu));
        let loss =
            autocast(Precision::Bf16, Device::Cpu, || logits.matmul(&w).log_softmax(-1, Kind::Float).mean(Kind::Float))
                .unwrap();
        assert_eq!(loss.kind(), Kind::Float);
    }

    #[test]
    fn the_tf32_switch_reaches_libtorch() {
        set_tf32(true).unwrap();
        assert!(tf32_allowed().unwrap());
        set_tf32(false).unwrap();
        assert!(!tf32_allowed().unwrap());
    }
}
