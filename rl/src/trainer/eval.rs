//! Held-out evaluation: greedy answers to the held-out prompts, scored by the job's reward.

use rtrain_trainer::hf::{FinishReason, HfModel, SamplingParams, Tokenizer, generate};
use serde::Serialize;

use crate::prompts::Prompt;
use crate::reward::{RewardFn, RewardInput};

/// Prompts generated for at once.
const EVAL_BATCH: usize = 64;

/// Scores on the held-out prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Fraction answered correctly, when the reward knows what is correct.
    pub accuracy: Option<f64>,
    /// Mean reward.
    pub reward: f64,
    pub prompts: usize,
}

/// Greedy generation (temperature 0) of up to `max_new_tokens` for every prompt, scored.
pub fn evaluate(
    model: &HfModel,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    reward: &mut dyn RewardFn,
    max_new_tokens: usize,
) -> Result<EvalResult, String> {
    let params = SamplingParams { max_new_tokens, temperature: 0.0, ..SamplingParams::default() };
    let (mut total, mut correct, mut known) = (0.0, 0usize, 0usize);
    for chunk in prompts.chunks(EVAL_BATCH) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.token_ids.clone()).collect();
        let out = generate(model, tokenizer, &ids, &params).map_err(|e| e.to_string())?;
        let inputs: Vec<RewardInput<'_>> = chunk
            .iter()
            .zip(&out)
            .map(|(p, g)| RewardInput {
                prompt: &p.text,
                response: &g.text,
                record: &p.record,
                ended: g.finish_reason == FinishReason::Stop,
            })
            .collect();
        for s in reward.score(&inputs).map_err(|e| e.to_string())? {
            total += s.reward;
            if let Some(c) = s.correct {
                known += 1;
                correct += usize::from(c);
            }
        }
    }
    let n = prompts.len().max(1) as f64;
    Ok(EvalResult {
        accuracy: (known > 0).then(|| correct as f64 / known as f64),
        reward: total / n,
        prompts: prompts.len(),
    })
}
