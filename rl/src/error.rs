//! The crate's error type and the shape checks every public function runs before touching tensors.

use tch::Tensor;

/// Everything that can go wrong in the RL numerics: malformed samples, mismatched tensor shapes,
/// impossible hyper-parameters and libtorch failures.
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    /// A batch, group or normaliser had nothing in it where something was needed.
    #[error("empty {what}")]
    Empty { what: &'static str },

    /// A sample's per-token field does not have one entry per response token.
    #[error("sample {prompt_id:?} (group {group_id}): {field} has {got} entries, the response has {expected} tokens")]
    SampleLength { prompt_id: String, group_id: u64, field: &'static str, expected: usize, got: usize },

    /// Two tensors that must line up token by token do not.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    Shape { what: &'static str, expected: Vec<i64>, got: Vec<i64> },

    /// A hyper-parameter outside its meaningful range.
    #[error("invalid {name} = {value}: {why}")]
    Config { name: &'static str, value: f64, why: &'static str },

    /// Sample (de)serialisation failed.
    #[error("sample JSON: {0}")]
    Json(#[from] serde_json::Error),

    /// libtorch refused an operation (wrong device, dtype, out of memory).
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, RlError>;

/// Fails unless `t` has exactly the shape `expected`.
pub(crate) fn check_shape(what: &'static str, t: &Tensor, expected: &[i64]) -> Result<()> {
    let got = t.size();
    if got == expected { Ok(()) } else { Err(RlError::Shape { what, expected: expected.to_vec(), got }) }
}

/// Fails unless `t` is a `[batch, tokens]` matrix; returns its shape.
pub(crate) fn check_matrix(what: &'static str, t: &Tensor) -> Result<[i64; 2]> {
    match t.size()[..] {
        [b, n] => Ok([b, n]),
        _ => Err(RlError::Shape { what, expected: vec![-1, -1], got: t.size() }),
    }
}

/// Fails unless `value` is finite and `> 0` (or `>= 0` when `allow_zero`).
pub(crate) fn check_positive(name: &'static str, value: f64, allow_zero: bool) -> Result<()> {
    let ok = value.is_finite() && (value > 0.0 || (allow_zero && value == 0.0));
    if ok { Ok(()) } else { Err(RlError::Config { name, value, why: "must be finite and positive" }) }
}
