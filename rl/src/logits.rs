//! What a policy's logits give the RL losses: the sampled tokens' log-probs and the entropy.

use tch::{Kind, Tensor};

use crate::error::{Result, RlError, check_shape};

/// log π(y_t) for each token `[B, T]` from the logits that predict it `[B, T, V]`, computed in
/// f32 or wider even for half-precision logits (log-softmax in bf16 loses the small ratios PPO
/// clips on).
pub fn token_log_probs(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let size = logits.size();
    let [b, t, _v] = size[..] else {
        return Err(RlError::Shape { what: "logits", expected: vec![-1, -1, -1], got: size });
    };
    check_shape("tokens", tokens, &[b, t])?;
    let kind = if logits.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let log_probs = logits.log_softmax(-1, kind);
    Ok(log_probs.gather(-1, &tokens.to_kind(Kind::Int64).unsqueeze(-1), false).squeeze_dim(-1))
}

/// Entropy `H = logsumexp(z) - Σ softmax(z)·z` of the distribution at every position
/// (`[..., V] -> [...]`), as veRL's `entropy_from_logits`; a metric, or a bonus term.
pub fn entropy_from_logits(logits: &Tensor) -> Tensor {
    let probs = logits.softmax(-1, logits.kind());
    logits.logsumexp([-1], false) - (probs * logits).sum_dim_intlist(-1, false, logits.kind())
}
