//! RL prompts: JSONL lines with a `prompt` (text) or chat `messages`, plus whatever fields the
//! reward reads (e.g. `answer`). The trainer and every rollout actor read the same file and agree
//! on prompts by index; the order of each step's prompts depends on the seed and the step alone.

use std::path::{Path, PathBuf};

use rtrain_trainer::data::splitmix::SplitMix64;
use rtrain_trainer::hf::{ChatMessage, Tokenizer};

/// One prompt: its text as the reward sees it, its tokens, and its JSON record.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The prompt text (the last user message for chat lines).
    pub text: String,
    pub token_ids: Vec<u32>,
    pub record: serde_json::Map<String, serde_json::Value>,
    /// `file:line`, for messages and sample ids.
    pub id: String,
}

/// Errors reading prompts, naming the file and line.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {reason}", path.display())]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{}: no prompts", path.display())]
    Empty { path: PathBuf },
}

/// Reads and tokenizes every prompt of `path`. Prompts longer than `max_prompt_tokens` are an
/// error naming the line (cutting a prompt would change the task).
pub fn load_prompts(path: &Path, tokenizer: &Tokenizer, max_prompt_tokens: usize) -> Result<Vec<Prompt>, PromptError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| PromptError::Read { path: path.to_path_buf(), source })?;
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| PromptError::Line { path: path.to_path_buf(), line: n + 1, reason };
        let record: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
            .map_err(|e| bad(format!("{e}; expected a JSON object with \"prompt\" or \"messages\"")))?;
        let (text, messages) = match (record.get("prompt"), record.get("messages")) {
            (Some(serde_json::Value::String(p)), None) => {
                (p.clone(), vec![ChatMessage { role: "user".into(), content: p.clone() }])
            }
            (None, Some(m)) => {
                let messages: Vec<ChatMessage> = serde_json::from_value(m.clone())
                    .map_err(|e| bad(format!("\"messages\": {e}; expected [{{\"role\", \"content\"}}, ...]")))?;
                let last_user = messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone());
                (last_user.ok_or_else(|| bad("\"messages\" has no user message".into()))?, messages)
            }
            _ => return Err(bad("needs a string \"prompt\" or a \"messages\" list (one of them)".into())),
        };
        let token_ids = if tokenizer.has_chat_template() {
            let rendered = tokenizer.apply_chat_template(&messages, true).map_err(|e| bad(e.to_string()))?;
            tokenizer.encode(&rendered, false)
        } else {
            tokenizer.encode(&text, true)
        }
        .map_err(|e| bad(e.to_string()))?;
        if token_ids.is_empty() {
            return Err(bad("the prompt has no tokens".into()));
        }
        if token_ids.len() > max_prompt_tokens {
            return Err(bad(format!(
                "the prompt has {} tokens; at most {max_prompt_tokens} leave room for the response (data.max_len - rl.max_new_tokens)",
                token_ids.len()
            )));
        }
        prompts.push(Prompt { text, token_ids, record, id: format!("{}:{}", path.display(), n + 1) });
    }
    if prompts.is_empty() {
        return Err(PromptError::Empty { path: path.to_path_buf() });
    }
    Ok(prompts)
}

/// Splits off the held-out prompts: the last `fraction` of the file, at least one, and at least
/// one left to train on (`None` for fewer than two prompts).
pub fn split_held_out(mut prompts: Vec<Prompt>, fraction: f64) -> Option<(Vec<Prompt>, Vec<Prompt>)> {
    let n = prompts.len();
    if n < 2 {
        return None;
    }
    let held = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let eval = prompts.split_off(n - held);
    Some((prompts, eval))
}

/// Which training prompt fills slot `slot` of step `step`: the prompts in a seeded order,
/// reshuffled every epoch, `per_step` at a time.
#[derive(Debug, Clone)]
pub struct PromptOrder {
    seed: u64,
    count: usize,
    per_step: usize,
    epoch: Option<(u64, Vec<usize>)>,
}

impl PromptOrder {
    pub fn new(seed: u64, count: usize, per_step: usize) -> Self {
        Self { seed, count, per_step, epoch: None }
    }

    pub fn prompt_at(&mut self, step: u64, slot: usize) -> usize {
        let global = step as u128 * self.per_step as u128 + slot as u128;
        let (epoch, offset) = ((global / self.count as u128) as u64, (global % self.count as u128) as usize);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.count).collect();
            let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
            for k in (1..self.count).rev() {
                order.swap(k, (rng.next_u64() % (k as u64 + 1)) as usize);
            }
            self.epoch = Some((epoch, order));
        }
        self.epoch.as_ref().map_or(0, |(_, order)| order[offset])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_visits_every_prompt_once() {
        let mut order = PromptOrder::new(7, 10, 4);
        let mut seen: Vec<usize> = (0..10).map(|i| order.prompt_at(i / 4, (i % 4) as usize)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let again = PromptOrder::new(7, 10, 4).prompt_at(3, 1);
        assert_eq!(order.prompt_at(3, 1), again);
    }

    #[test]
    fn held_out_split_keeps_both_sides() {
        let p = |i: usize| Prompt {
            text: i.to_string(),
            token_ids: vec![1],
            record: Default::default(),
            id: i.to_string(),
        };
        let (train, eval) = split_held_out((0..10).map(p).collect(), 0.2).unwrap();
        assert_eq!((train.len(), eval.len()), (8, 2));
        let (train, eval) = split_held_out((0..2).map(p).collect(), 0.01).unwrap();
        assert_eq!((train.len(), eval.len()), (1, 1));
        assert!(split_held_out((0..1).map(p).collect(), 0.5).is_none());
    }
}
