//! Rewards for rollout samples: the [`RewardFn`] trait a custom reward implements, the built-in
//! verifiable rewards (exact match, numeric answer, regex format), a remote HTTP endpoint, a
//! learned reward model, and [`build_reward`], which makes one from the resolved `[rl.reward]`
//! config.

mod error;
mod http;
mod model;
mod verifiable;

use rtrain_core::config::RewardSpec;
use serde_json::{Map, Value};
use tch::Device;

pub use error::{EndpointFailure, RewardError};
pub use http::HttpReward;
pub use model::ModelReward;
pub use verifiable::{ExactMatch, NumericAnswer, RegexFormat, last_number};

/// One sample to score: the prompt as text, the generated response, and the dataset record it
/// came from (its `answer` and any other fields the reward needs).
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    pub response: &'a str,
    pub record: &'a Map<String, Value>,
    /// The response ended (an EOS, a stop token or string) rather than running out of tokens: a
    /// learned reward model reads it with the EOS it was trained on.
    pub ended: bool,
}

/// A sample's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub reward: f64,
    /// Whether the answer is right, for rewards that can tell (reported as accuracy); `None` for
    /// format rewards, remote scorers that do not say, and learned rewards.
    pub correct: Option<bool>,
}

/// Scores a batch of samples, one [`Scored`] per input in order. `&mut self` lets a reward keep
/// state (a connection, a model, counters); `Send` lets a rollout actor own it on its thread.
pub trait RewardFn: Send {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError>;
}

/// The reward `spec` describes; a reward model runs on `device` (the policy's, so a GPU actor
/// scores on its GPU).
pub fn build_reward(spec: &RewardSpec, device: Device) -> Result<Box<dyn RewardFn>, RewardError> {
    Ok(match spec {
        RewardSpec::Exact { field } => Box::new(ExactMatch::new(field)),
        RewardSpec::Numeric { field, tolerance } => Box::new(NumericAnswer::new(field, *tolerance)),
        RewardSpec::Regex { pattern } => Box::new(RegexFormat::new(pattern)?),
        RewardSpec::Http { url, timeout, retries } => Box::new(HttpReward::new(url, *timeout, *retries)),
        RewardSpec::Model { path, batch } => Box::new(ModelReward::load(path, *batch, device)?),
    })
}
