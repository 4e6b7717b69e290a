//! Preference pairs from JSONL: one prompt, a chosen and a rejected response, as token ids.
//!
//! Each line is one of (TRL's dataset forms):
//! - `{"prompt": "...", "chosen": "...", "rejected": "..."}`: text. With a chat template the
//!   prompt becomes a user message and each response an assistant message; without one, the
//!   prompt is encoded with the tokenizer's BOS and each response follows, ended by EOS.
//! - `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`: chat with an explicit
//!   prompt, rendered with the model folder's chat template.
//! - `{"chosen": [messages], "rejected": [messages]}`: chat with an implicit prompt, the messages
//!   both conversations share at their start.
//!
//! An optional number `margin` (how much better the chosen response is) enters the reward
//! model's loss. Other fields are ignored.

use std::path::Path;

use rtrain_trainer::data::DataError;
use rtrain_trainer::hf::{ChatMessage, Tokenizer};
use serde::Deserialize;

/// One tokenized pair: the prompt's ids and each response's ids after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Vec<i64>,
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
    pub margin: f64,
}

impl Pair {
    /// The prompt followed by `response`.
    pub fn sequence(&self, response: &[i64]) -> Vec<i64> {
        let mut ids = self.prompt.clone();
        ids.extend_from_slice(response);
        ids
    }

    /// Tokens of both sequences.
    pub fn tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.len() + self.rejected.len()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Plain(String),
    Chat(Vec<ChatMessage>),
}

#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    prompt: Option<Text>,
    chosen: Text,
    rejected: Text,
    #[serde(default)]
    margin: Option<f64>,
}

/// What [`load_pairs`] read.
#[derive(Debug)]
pub struct Pairs {
    pub pairs: Vec<Pair>,
    /// Pairs left with no response token within `max_len` in either response.
    pub dropped: usize,
}

/// Reads and tokenizes a JSONL file of pairs; each sequence (prompt and response) is cut to
/// `max_len` tokens, and pairs where either response keeps no token are dropped (counted).
pub fn load_pairs(path: &Path, tokenizer: &Tokenizer, max_len: usize) -> Result<Pairs, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Read { path: path.to_path_buf(), source })?;
    let mut pairs = Vec::new();
    let mut dropped = 0;
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let example = |reason: String| DataError::Example { path: path.to_path_buf(), line: n + 1, reason };
        let parsed: Line = serde_json::from_str(line).map_err(|e| {
            example(format!(
                "{e}; expected {{\"prompt\", \"chosen\", \"rejected\"}} (text or chat messages), or \
                 {{\"chosen\": [messages], \"rejected\": [messages]}}"
            ))
        })?;
        let pair = tokenize(parsed, tokenizer).map_err(example)?;
        match truncate(pair, max_len) {
            Some(p) => pairs.push(p),
            None => dropped += 1,
        }
    }
    if pairs.is_empty() {
        return Err(DataError::Example {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("no pair with response tokens within data.max_len = {max_len}"),
        });
    }
    Ok(Pairs { pairs, dropped })
}

/// Cuts prompt + response to `max_len` tokens; `None` when a response keeps nothing.
fn truncate(mut pair: Pair, max_len: usize) -> Option<Pair> {
    let room = max_len.checked_sub(pair.prompt.len()).filter(|&r| r > 0)?;
    pair.chosen.truncate(room);
    pair.rejected.truncate(room);
    (!pair.chosen.is_empty() && !pair.rejected.is_empty()).then_some(pair)
}

fn tokenize(line: Line, tok: &Tokenizer) -> Result<Pair, String> {
    let margin = line.margin.unwrap_or(0.0);
    if !margin.is_finite() {
        return Err(format!("margin must be a finite number, got {margin}"));
    }
    let encode = |text: &str, special: bool| -> Result<Vec<i64>, String> {
        Ok(tok.encode(text, special).map_err(|e| e.to_string())?.into_iter().map(i64::from).collect())
    };
    let (prompt, chosen, rejected) = match (line.prompt, line.chosen, line.rejected) {
        (Some(Text::Plain(p)), Text::Plain(c), Text::Plain(r)) if !tok.has_chat_template() => {
            let eos: Vec<i64> = tok.eos.iter().map(|s| i64::from(s.id)).collect();
            let response = |text: &str| -> Result<Vec<i64>, String> {
                let mut ids = encode(text, false)?;
                ids.extend(&eos);
                Ok(ids)
            };
            return Ok(Pair { prompt: encode(&p, true)?, chosen: response(&c)?, rejected: response(&r)?, margin });
        }
        (Some(Text::Plain(p)), Text::Plain(c), Text::Plain(r)) => {
            let message = |role: &str, content: String| vec![ChatMessage { role: role.into(), content }];
            (message("user", p), message("assistant", c), message("assistant", r))
        }
        (Some(Text::Chat(p)), Text::Chat(c), Text::Chat(r)) => (p, c, r),
        (None, Text::Chat(c), Text::Chat(r)) => {
            let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                return Err("chosen and rejected share no prompt messages; add a \"prompt\" field".into());
            }
            (c[..shared].to_vec(), c[shared..].to_vec(), r[shared..].to_vec())
        }
        (None, _, _) => {
            return Err("\"prompt\" is missing (only chat conversations may leave it implicit)".into());
        }
        _ => return Err("prompt, chosen and rejected must all be text or all be chat messages".into()),
    };
    if chosen.is_empty() || rejected.is_empty() {
        return Err("chosen and rejected must each add at least one message after the prompt".into());
    }
    if !tok.has_chat_template() {
        return Err(
            "chat messages need a chat template (chat_template in the model folder's tokenizer_config.json)".into()
        );
    }
    let render =
        |messages: &[ChatMessage], generation_prompt: bool| tok.apply_chat_template(messages, generation_prompt);
    let prompt_text = render(&prompt, true).map_err(|e| e.to_string())?;
    let response = |messages: Vec<ChatMessage>| -> Result<Vec<i64>, String> {
        let full = render(&[prompt.clone(), messages].concat(), false).map_err(|e| e.to_string())?;
        let answer = full
            .strip_prefix(prompt_text.as_str())
            .ok_or("the chat template does not render the prompt as the start of the conversation")?;
        encode(answer, false)
    };
    Ok(Pair { prompt: encode(&prompt_text, false)?, chosen: response(chosen)?, rejected: response(rejected)?, margin })
}

/// Splits `pairs` into training and held-out pairs: the last `fraction` of them (at least one,
/// leaving at least one to train on) are held out.
pub fn hold_out(mut pairs: Vec<Pair>, fraction: f64) -> Result<(Vec<Pair>, Vec<Pair>), String> {
    if pairs.len() < 2 {
        return Err(format!(
            "{} pair(s) cannot be split into training and held-out pairs; add pairs or name data.eval_path",
            pairs.len()
        ));
    }
    let held = ((pairs.len() as f64 * fraction).round() as usize).clamp(1, pairs.len() - 1);
    let eval = pairs.split_off(pairs.len() - held);
    Ok((pairs, eval))
}

#[cfg(test)]
mod tests {
    use super::{Pair, hold_out, truncate};

    fn pair(prompt: usize, chosen: usize, rejected: usize) -> Pair {
        Pair { prompt: vec![1; prompt], chosen: vec![2; chosen], rejected: vec![3; rejected], margin: 0.0 }
    }

    #[test]
    fn truncation_keeps_the_prompt_and_cuts_responses() {
        let p = truncate(pair(3, 5, 2), 6).unwrap();
        assert_eq!((p.prompt.len(), p.chosen.len(), p.rejected.len()), (3, 3, 2));
        assert!(truncate(pair(6, 5, 2), 6).is_none(), "nothing of a response fits");
        assert!(truncate(pair(7, 5, 2), 6).is_none());
        assert_eq!(truncate(pair(2, 1, 1), 6), Some(pair(2, 1, 1)));
    }

    #[test]
    fn holding_out_leaves_both_sides_non_empty() {
        let all: Vec<Pair> = (0..10).map(|n| pair(1, n + 1, 1)).collect();
        let (train, eval) = hold_out(all.clone(), 0.2).unwrap();
        assert_eq!((train.len(), eval.len()), (8, 2));
        assert_eq!(eval[1], all[9], "the last pairs are held out");
        assert_eq!(hold_out(all.clone(), 0.01).unwrap().1.len(), 1);
        assert_eq!(hold_out(all, 0.99).unwrap().0.len(), 1);
        assert!(hold_out(vec![pair(1, 1, 1)], 0.5).is_err());
    }
}
