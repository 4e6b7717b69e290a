//! Collating samples into the padded tensors the trainer's forward pass and losses read.
//!
//! Layout (as veRL's): prompts are *left*-padded to the longest prompt `P`, responses
//! *right*-padded to the longest response `R`, and `input_ids = [prompt | response]` is
//! `[B, P + R]`. Every response then starts at column `P`, so response token `t` of every row is
//! predicted by the logits at column `P - 1 + t`: one `narrow` gives all response log-probs,
//! with no per-row offsets. All response-side tensors are `[B, R]`.

use std::borrow::Borrow;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, RlError};
use crate::logits::token_log_probs;
use crate::sample::Sample;

/// A collated batch of samples.
#[derive(Debug)]
pub struct RolloutBatch {
    /// `[B, P + R]` int64: left-padded prompt then right-padded response; padding is `pad_token_id`.
    pub input_ids: Tensor,
    /// `[B, P + R]` int64: 1 on prompt and response tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// `[B, P + R]` int64: 0 at each row's first real token, counting real tokens only (left
    /// padding would shift absolute positions otherwise); 0 on left padding.
    pub position_ids: Tensor,
    /// `[B, R]` int64: the response tokens, `pad_token_id` after each response's end.
    pub response_ids: Tensor,
    /// `[B, R]` float 0/1: the sample's loss mask on its response tokens, 0 on padding.
    pub loss_mask: Tensor,
    /// `[B, R]` float: the rollout engine's log-probs, 0 on padding.
    pub behaviour_log_probs: Tensor,
    /// `[B]` float: each sample's `reward.total`.
    pub scores: Tensor,
    /// Each row's group id, for GRPO.
    pub group_ids: Vec<u64>,
    /// Each row's policy version, for staleness checks.
    pub policy_versions: Vec<u64>,
    /// `P`, the padded prompt length.
    pub prompt_len: i64,
}

/// Pads and stacks `samples` (validated first) into a [`RolloutBatch`] of float dtype `kind` on
/// `device`.
/// `samples` may be owned or borrowed (`&[Sample]` or `&[&Sample]`).
pub fn collate<S: Borrow<Sample>>(
    samples: &[S],
    pad_token_id: i64,
    kind: Kind,
    device: Device,
) -> Result<RolloutBatch> {
    let samples: Vec<&Sample> = samples.iter().map(Borrow::borrow).collect();
    if samples.is_empty() {
        return Err(RlError::Empty { what: "list of samples to collate" });
    }
    for sample in &samples {
        sample.validate()?;
    }
    let p = samples.iter().map(|s| s.prompt_token_ids.len()).max().unwrap_or(0);
    let r = samples.iter().map(|s| s.response_token_ids.len()).max().unwrap_or(0);
    let b = samples.len();
    let mut input_ids = vec![pad_token_id; b * (p + r)];
    let mut attention = vec![0i64; b * (p + r)];
    let mut response_ids = vec![pad_token_id; b * r];
    let mut loss_mask = vec![0f32; b * r];
    let mut behaviour = vec![0f32; b * r];
    for (i, s) in samples.iter().enumerate() {
        let row = i * (p + r);
        let start = row + p - s.prompt_token_ids.len();
        for (j, &tok) in s.prompt_token_ids.iter().enumerate() {
            input_ids[start + j] = i64::from(tok);
            attention[start + j] = 1;
        }
        for (j, &tok) in s.response_token_ids.iter().enumerate() {
            input_ids[row + p + j] = i64::from(tok);
            attention[row + p + j] = 1;
            response_ids[i * r + j] = i64::from(tok);
            loss_mask[i * r + j] = if s.loss_mask[j] { 1.0 } else { 0.0 };
            behaviour[i * r + j] = s.behaviour_log_probs[j];
        }
    }
    let (b, p, r) = (b as i64, p as i64, r as i64);
    let int = |v: &[i64], cols: i64| Tensor::from_slice(v).view([b, cols]).to_device(device);
    let float = |v: &[f32]| Tensor::from_slice(v).view([b, r]).to_kind(kind).to_device(device);
    let attention_mask = int(&attention, p + r);
    let position_ids = (attention_mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let scores: Vec<f64> = samples.iter().map(|s| s.reward.total).collect();
    Ok(RolloutBatch {
        input_ids: int(&input_ids, p + r),
        attention_mask,
        position_ids,
        response_ids: int(&response_ids, r),
        loss_mask: float(&loss_mask),
        behaviour_log_probs: float(&behaviour),
        scores: Tensor::from_slice(&scores).to_kind(kind).to_device(device),
        group_ids: samples.iter().map(|s| s.group_id).collect(),
        policy_versions: samples.iter().map(|s| s.policy_version).collect(),
        prompt_len: p,
    })
}

impl RolloutBatch {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.group_ids.len()
    }

    /// Whether the batch has no rows (never true for a collated batch).
    pub fn is_empty(&self) -> bool {
        self.group_ids.is_empty()
    }

    /// The response tokens' log-probs `[B, R]` from the model's logits over `input_ids`
    /// `[B, P + R, V]`: column `P - 1 + t` predicts response token `t`.
    pub fn response_log_probs(&self, logits: &Tensor) -> Result<Tensor> {
        let r = self.response_ids.size()[1];
        if self.prompt_len == 0 {
            return Err(RlError::Empty { what: "prompt (the first response token has no logits predicting it)" });
        }
        let size = logits.size();
        if size.len() != 3 || size[..2] != self.input_ids.size()[..] {
            return Err(RlError::Shape { what: "logits over input_ids", expected: self.input_ids.size(), got: size });
        }
        token_log_probs(&logits.narrow(1, self.prompt_len - 1, r), &self.response_ids)
    }
}
