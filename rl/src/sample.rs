//! One rollout sample as it travels from a rollout actor to the trainer (JSON over the wire).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RlError};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence or stop string was produced.
    Stop,
    /// The response hit the token limit (truncated; some recipes mask or penalise these).
    Length,
    /// Generation or the environment failed; the sample is kept for accounting.
    Error,
}

/// A sample's reward: the scalar the algorithms use and, optionally, the named parts it was made
/// of (for logging: `correctness`, `format`, `length_penalty`...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    pub total: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, f64>,
}

/// One prompt and one generated response with everything training needs from the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The dataset's id for the prompt.
    pub prompt_id: String,
    /// Samples generated for the same prompt in the same rollout step share a group id (GRPO's
    /// group).
    pub group_id: u64,
    pub prompt_token_ids: Vec<u32>,
    pub response_token_ids: Vec<u32>,
    /// One flag per response token: `false` for tokens the policy did not choose (tool output,
    /// environment observations in a multi-turn rollout), which get no loss.
    pub loss_mask: Vec<bool>,
    /// log π_behaviour of each response token, as the rollout engine computed it (any finite
    /// value where `loss_mask` is false).
    pub behaviour_log_probs: Vec<f32>,
    /// Version of the policy weights that generated the response (bounds staleness).
    pub policy_version: u64,
    pub reward: Reward,
    pub finish_reason: FinishReason,
}

impl Sample {
    /// Fails unless every per-token field has one entry per response token and the numbers the
    /// losses read are finite.
    pub fn validate(&self) -> Result<()> {
        let expected = self.response_token_ids.len();
        for (field, got) in
            [("loss_mask", self.loss_mask.len()), ("behaviour_log_probs", self.behaviour_log_probs.len())]
        {
            if got != expected {
                return Err(RlError::SampleLength {
                    prompt_id: self.prompt_id.clone(),
                    group_id: self.group_id,
                    field,
                    expected,
                    got,
                });
            }
        }
        if !self.reward.total.is_finite() {
            return Err(RlError::Config { name: "reward.total", value: self.reward.total, why: "must be finite" });
        }
        if let Some(bad) = self.behaviour_log_probs.iter().find(|x| !x.is_finite()) {
            return Err(RlError::Config { name: "behaviour_log_probs", value: f64::from(*bad), why: "must be finite" });
        }
        Ok(())
    }

    /// The sample as one JSON object.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// A sample from JSON, validated.
    pub fn from_json(text: &str) -> Result<Self> {
        let sample: Self = serde_json::from_str(text)?;
        sample.validate()?;
        Ok(sample)
    }
}
