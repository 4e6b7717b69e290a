//! `rtrain generate` from the built-in byte-level GPT: a checkpoint of an `lm` run (or the run
//! directory, whose newest checkpoint that verifies is taken). The prompt's bytes are the input
//! ids; what is generated is decoded as UTF-8 (invalid bytes shown as U+FFFD).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::checkpoint::{self, MODEL_FILE, STATE_FILE};
use crate::data::splitmix::SplitMix64;
use crate::hf::{FinishReason, Generation, SamplingParams, pick};
use crate::model::{Gpt, GptConfig};

/// The checkpoint `path` names for the byte-level GPT: a checkpoint directory, or a run whose
/// newest valid checkpoint is taken; `None` when `path` is something else (a Hugging Face folder).
pub fn gpt_checkpoint(path: &Path) -> Result<Option<PathBuf>, String> {
    if path.join("config.json").exists() {
        return Ok(None);
    }
    if path.join(STATE_FILE).exists() {
        checkpoint::verify(path)
            .map_err(|e| format!("{} does not match its manifest: {e} (see `rtrain ckpt verify`)", path.display()))?;
        return Ok(Some(path.to_path_buf()));
    }
    if path.join(checkpoint::CHECKPOINTS_DIR).is_dir() {
        let scan = checkpoint::newest_valid(path).map_err(|e| e.to_string())?;
        for (skipped, why) in &scan.skipped {
            eprintln!("warning: skipping {}, which does not match its manifest: {why}", skipped.path.display());
        }
        return match scan.newest {
            Some((c, _)) => Ok(Some(c.path)),
            None => Err(format!("{} has no checkpoint that verifies (see `rtrain ckpt verify`)", path.display())),
        };
    }
    Ok(None)
}

/// A byte-level GPT restored from a checkpoint.
pub struct ByteGpt {
    model: Gpt,
    _vs: VarStore,
    device: Device,
}

impl ByteGpt {
    pub fn load(ckpt: &Path, device: Device) -> Result<Self, String> {
        let state = checkpoint::read_state(ckpt).map_err(|e| e.to_string())?;
        let dim = |key: &str| {
            state.model.get(key).and_then(serde_json::Value::as_i64).ok_or_else(|| {
                // A fine-tuned Hugging Face model is generated from the folder its run exports.
                let exported = ckpt.parent().and_then(Path::parent).map(|run| run.join("model"));
                let hint = match exported.filter(|m| m.join("config.json").exists()) {
                    Some(folder) => format!("; its run exported the model as {}: use that", folder.display()),
                    None => String::new(),
                };
                format!(
                    "{} is not a checkpoint of the built-in GPT (trainer_state.json names no model.{key}); a Hugging \
                     Face model is generated from its folder (config.json, *.safetensors, tokenizer.json){hint}",
                    ckpt.display()
                )
            })
        };
        let config = GptConfig {
            vocab_size: dim("vocab_size")?,
            n_ctx: dim("n_ctx")?,
            n_layer: dim("n_layer")?,
            n_head: dim("n_head")?,
            n_embd: dim("n_embd")?,
        };
        let vs = VarStore::new(device);
        let model = config.init(&vs.root());
        let file = ckpt.join(MODEL_FILE);
        let saved: HashMap<String, Tensor> =
            Tensor::read_safetensors(&file).map_err(|e| format!("{}: {e}", file.display()))?.into_iter().collect();
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                let value = saved.get(&name).ok_or_else(|| format!("{}: no tensor `{name}`", file.display()))?;
                if value.size() != var.size() {
                    return Err(format!(
                        "{}: `{name}` is {:?}, the model's is {:?}",
                        file.display(),
                        value.size(),
                        var.size()
                    ));
                }
                var.f_copy_(value).map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        Ok(Self { model, _vs: vs, device })
    }

    /// Continues `prompt` (its bytes) under `params`; each call draws from `rng`.
    pub fn generate(&self, prompt: &str, params: &SamplingParams, rng: &mut SplitMix64) -> Result<Generation, String> {
        let n_ctx = self.model.config().n_ctx as usize;
        let vocab = self.model.config().vocab_size;
        let mut ids: Vec<i64> = prompt.bytes().map(i64::from).collect();
        if let Some(&big) = ids.iter().find(|&&b| b >= vocab) {
            return Err(format!("the prompt has byte {big}, outside the model's vocabulary of {vocab}"));
        }
        let start = ids.len();
        let (mut logprobs, mut finish) = (Vec::new(), FinishReason::Length);
        let _no_grad = tch::no_grad_guard();
        for _ in 0..params.max_new_tokens {
            // An empty prompt starts from a newline.
            let window =
                if ids.is_empty() { vec![i64::from(b'\n')] } else { ids[ids.len().saturating_sub(n_ctx)..].to_vec() };
            let input = Tensor::from_slice(&window).view([1, -1]).to_device(self.device);
            let logits = self.model.forward(&input).select(1, -1).squeeze_dim(0);
            let logits = Vec::<f32>::try_from(logits.to_kind(tch::Kind::Float).to_device(Device::Cpu))
                .map_err(|e| e.to_string())?;
            let (token, logprob) = pick(&logits, params, rng);
            ids.push(i64::from(token));
            logprobs.push(logprob);
            let text = bytes_text(&ids[start..]);
            if params.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                finish = FinishReason::Stop;
                break;
            }
        }
        let mut text = bytes_text(&ids[start..]);
        if let Some(cut) = params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        Ok(Generation {
            token_ids: ids[start..].iter().map(|&i| i as u32).collect(),
            text,
            logprobs,
            finish_reason: finish,
        })
    }
}

fn bytes_text(ids: &[i64]) -> String {
    String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned()
}
