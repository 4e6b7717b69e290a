//! Run with: cargo run --example custom_reward
//!
//! A custom reward for RL post-training: the built-in numeric-answer reward, minus a penalty for
//! responses longer than a budget (so the policy learns to answer briefly). A reward is any type
//! implementing `RewardFn`: it scores a batch of samples, one `Scored` per input, in order.

use rtrain_rl::reward::NumericAnswer;
use rtrain_rl::{RewardError, RewardFn, RewardInput, Scored};
use serde_json::{Map, json};

/// Correctness from `inner`, minus `penalty` per character past `budget` (at most 1 in all).
struct LengthPenalty<R> {
    inner: R,
    budget: usize,
    penalty: f64,
}

impl<R: RewardFn> RewardFn for LengthPenalty<R> {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError> {
        let mut scores = self.inner.score(inputs)?;
        for (scored, input) in scores.iter_mut().zip(inputs) {
            let excess = input.response.chars().count().saturating_sub(self.budget);
            scored.reward -= (excess as f64 * self.penalty).min(1.0);
            // `correct` stays the inner verdict: accuracy is reported without the penalty.
        }
        Ok(scores)
    }
}

fn main() -> Result<(), RewardError> {
    let mut reward = LengthPenalty { inner: NumericAnswer::new("answer", 1e-6), budget: 12, penalty: 0.02 };
    let record = &Map::from_iter([("answer".to_string(), json!(42))]);
    let responses = ["42", "The answer is 42.", "Let me think step by step: 6 * 7 = 42", "41"];
    let inputs: Vec<RewardInput<'_>> = responses
        .iter()
        .map(|response| RewardInput { prompt: "What is 6 * 7?", response, record, ended: true })
        .collect();
    for (response, scored) in responses.iter().zip(reward.score(&inputs)?) {
        println!("{:>6.2}  correct={:<5}  {response:?}", scored.reward, scored.correct.unwrap_or(false));
    }
    Ok(())
}
