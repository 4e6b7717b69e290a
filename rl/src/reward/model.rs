//! A learned reward: a Hugging Face sequence-classification folder scoring prompt + response.

use std::path::{Path, PathBuf};

use rtrain_trainer::hf::{HfError, RewardModel, Tokenizer};
use tch::Device;

use super::{RewardError, RewardFn, RewardInput, Scored};

/// Scores each sample with a reward model, `batch` samples per forward pass. The model reads
/// `prompt + response` as one text, tokenized as transformers' `tokenizer(text)` does (special
/// tokens included); a response that ended is closed as rtrain's reward-model training closes
/// responses: with what the folder's chat template writes after an assistant message
/// (`<|im_end|>\n`), or with the tokenizer's EOS when there is no template (as TRL and OpenRLHF
/// score the generated ids, EOS included). A prompt that needs the chat template must already
/// carry it.
#[derive(Debug)]
pub struct ModelReward {
    path: PathBuf,
    model: RewardModel,
    tokenizer: Tokenizer,
    /// What the chat template writes after an assistant message, if the folder has one.
    turn_end: Option<String>,
    batch: usize,
}

impl ModelReward {
    /// Loads the folder at `path` (config.json, weights, tokenizer.json) onto `device`.
    pub fn load(path: &Path, batch: usize, device: Device) -> Result<Self, RewardError> {
        let failed = |e: HfError| RewardError::Model { path: path.to_path_buf(), message: e.to_string() };
        let model = RewardModel::load(path, device).map_err(failed)?;
        let tokenizer = Tokenizer::from_dir(path).map_err(failed)?;
        let turn_end = tokenizer.turn_end_text();
        Ok(Self { path: path.to_path_buf(), model, tokenizer, turn_end, batch: batch.max(1) })
    }
}

impl RewardFn for ModelReward {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError> {
        let failed = |e: HfError| RewardError::Model { path: self.path.clone(), message: e.to_string() };
        let mut scores = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.batch) {
            let ids = chunk
                .iter()
                .map(|i| {
                    // An ended response closes as training pairs do: with the chat template's
                    // end of turn, or the EOS without a template.
                    match (i.ended, &self.turn_end) {
                        (true, Some(end)) => self.tokenizer.encode(&format!("{}{}{end}", i.prompt, i.response), true),
                        (ended, _) => {
                            let mut ids = self.tokenizer.encode(&format!("{}{}", i.prompt, i.response), true)?;
                            ids.extend(self.tokenizer.eos.iter().filter(|_| ended).map(|eos| eos.id));
                            Ok(ids)
                        }
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(failed)?;
            let rewards = self.model.score(&ids).map_err(failed)?;
            scores.extend(rewards.into_iter().map(|reward| Scored { reward, correct: None }));
        }
        Ok(scores)
    }
}
