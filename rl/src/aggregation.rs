//! Loss aggregation (veRL's `loss_agg_mode`) with a normaliser taken from the *global* batch.
//!
//! A micro-batch's aggregated loss is its share of the global-batch loss: the numerator covers
//! only the micro-batch's tokens, the denominator is the caller's [`LossNormaliser`], counted once
//! over the whole global batch (all micro-batches of all ranks). Summing the shares over
//! micro-batches and ranks therefore gives exactly the loss (and gradient) of the unsplit batch,
//! whatever the split. With rtrain's DDP, which *averages* gradients over ranks, multiply each
//! rank's loss by the world size before `backward` (veRL's `* dp_size`).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, RlError, check_matrix, check_positive, check_shape};

/// How per-token losses `[B, T]` become one scalar, named as in veRL.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum LossAggregation {
    /// `token-mean`: the sum over every loss token of the global batch divided by the global
    /// token count. Every token weighs the same (DAPO); long answers weigh more than short ones.
    TokenMean,
    /// `seq-mean-token-mean`: each sequence's mean over its own loss tokens, then the mean over
    /// the global batch's sequences (original GRPO). A sequence without loss tokens adds 0.
    SeqMeanTokenMean,
    /// `seq-mean-token-sum-norm`: each sequence's token *sum* divided by a constant `length`
    /// (usually the maximum response length), then the mean over the global batch's sequences
    /// (Dr. GRPO). No dependence on the sampled lengths at all.
    SeqMeanTokenSumNorm {
        /// The constant divisor; must not change during training.
        length: f64,
    },
}

/// The global batch's counts that turn local sums into shares of the global loss.
///
/// Count them once over the full global batch (or all-reduce the per-rank counts with a sum) and
/// pass the same normaliser to every micro-batch of every rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossNormaliser {
    tokens: f64,
    sequences: f64,
}

impl LossNormaliser {
    /// A normaliser from global counts: loss tokens, and sequences with at least one loss token.
    pub fn new(tokens: f64, sequences: f64) -> Result<Self> {
        check_positive("global token count", tokens, false)?;
        check_positive("global sequence count", sequences, false)?;
        Ok(Self { tokens, sequences })
    }

    /// The counts of a `[B, T]` loss mask (for the global batch held whole, or one rank's part
    /// before an all-reduce). Sync point: reads two numbers back from the device.
    pub fn from_mask(mask: &Tensor) -> Result<Self> {
        check_matrix("loss mask", mask)?;
        let mask = mask.to_kind(tch::Kind::Double);
        let tokens = mask.sum(tch::Kind::Double).double_value(&[]);
        let sequences = mask.sum_dim_intlist(-1, false, tch::Kind::Double).gt(0.0).sum(tch::Kind::Double);
        if tokens == 0.0 {
            return Err(RlError::Empty { what: "loss mask (no token to train on)" });
        }
        Self::new(tokens, sequences.double_value(&[]))
    }

    /// The counts of two disjoint parts added (ranks or micro-batches counted separately).
    pub fn merge(self, other: Self) -> Self {
        Self { tokens: self.tokens + other.tokens, sequences: self.sequences + other.sequences }
    }

    /// Loss tokens in the global batch.
    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    /// Sequences with at least one loss token in the global batch.
    pub fn sequences(&self) -> f64 {
        self.sequences
    }
}

impl LossAggregation {
    /// This micro-batch's share of the global aggregated loss of `per_token` `[B, T]` under the
    /// loss `mask` `[B, T]`; differentiable in `per_token`.
    pub fn aggregate(&self, per_token: &Tensor, mask: &Tensor, norm: &LossNormaliser) -> Result<Tensor> {
        check_matrix("per-token loss", per_token)?;
        check_shape("loss mask", mask, &per_token.size())?;
        let kind = per_token.kind();
        let mask = mask.to_kind(kind);
        let masked = per_token * &mask;
        Ok(match *self {
            Self::TokenMean => masked.sum(kind) / norm.tokens,
            Self::SeqMeanTokenMean => {
                // clamp: an all-masked row has sum 0 and must add 0, not 0/0.
                let lengths = mask.sum_dim_intlist(-1, false, kind).clamp_min(1.0);
                (masked.sum_dim_intlist(-1, false, kind) / lengths).sum(kind) / norm.sequences
            }
            Self::SeqMeanTokenSumNorm { length } => {
                check_positive("seq-mean-token-sum-norm length", length, false)?;
                masked.sum(kind) / (length * norm.sequences)
            }
        })
    }
}
