//! Statistics over the tokens a mask selects, as TRL and veRL define them (`masked_mean`,
//! `masked_var`, `masked_whiten`).
//!
//! Masks may be bool, integer or float 0/1 tensors; they are converted to the values' dtype and
//! multiplied in, so padded positions contribute nothing provided they hold finite numbers
//! (`NaN * 0` is still `NaN`).

use tch::Tensor;

use crate::error::{Result, RlError, check_shape};

/// Sum of `values` over the positions where `mask` is 1 (a 0-d tensor).
pub fn masked_sum(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_shape("mask", mask, &values.size())?;
    Ok((values * mask.to_kind(values.kind())).sum(values.kind()))
}

/// Mean of `values` over the positions where `mask` is 1; `NaN` for an empty mask.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(masked_sum(values, mask)? / mask.to_kind(values.kind()).sum(values.kind()))
}

/// Variance of the masked values around their masked mean; `unbiased` applies Bessel's
/// correction `n / (n - 1)` as TRL's and veRL's `masked_var` do.
///
/// Sync point: reads the token count back to refuse fewer than 2 tokens (1 when biased).
pub fn masked_var(values: &Tensor, mask: &Tensor, unbiased: bool) -> Result<Tensor> {
    check_shape("mask", mask, &values.size())?;
    let count = mask.to_kind(values.kind()).sum(values.kind()).double_value(&[]);
    if count < if unbiased { 2.0 } else { 1.0 } {
        return Err(RlError::Empty { what: "mask (variance needs at least 2 tokens)" });
    }
    let centered = values - masked_mean(values, mask)?;
    let var = masked_mean(&centered.square(), mask)?;
    Ok(if unbiased { var * (count / (count - 1.0)) } else { var })
}

/// Whitens the masked values: `(x - mean) / sqrt(var + 1e-8)` with the unbiased masked variance,
/// as `masked_whiten` in TRL and veRL; `shift_mean = false` adds the mean back (scale only).
///
/// Unlike those, positions outside the mask are set to 0 rather than left as whitened padding.
/// The statistics are those of the tensor given: whiten the whole global batch once, before it
/// is split into micro-batches, or the advantages would depend on the split.
pub fn masked_whiten(values: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let mean = masked_mean(values, mask)?;
    let var = masked_var(values, mask, true)?;
    let mut whitened = (values - &mean) * (var + 1e-8).rsqrt();
    if !shift_mean {
        whitened += mean;
    }
    Ok(whitened * mask.to_kind(values.kind()))
}
