//! Supervised fine-tuning of a Hugging Face model folder on JSONL examples, with the loss on
//! response tokens only, through the same engine (DDP, optimizer, checkpoints) as every
//! built-in trainer. At the end rank 0 exports the model as a Hugging Face folder, `<run>/model/`.
//!
//! Each line is `{"prompt": ..., "response": ...}` or `{"messages": [{"role", "content"}, ...]}`
//! (the assistant messages are trained). With a chat template, prompt/response pairs become a
//! user and an assistant message; without one, the prompt is encoded as text (with the
//! tokenizer's BOS) and the response follows, ended by EOS.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::nn::VarStore;
use tch::{Kind, Reduction, Tensor};

use crate::config::HeldOut;
use crate::data::DataError;
use crate::data::Epochs;
use crate::engine::{MicroLoss, TrainStep};
use crate::hf::{ChatMessage, HfModel, Tokenizer};
use crate::train_loop::{Fingerprint, Sample, TrainContext, TrainError, write_samples};

/// Examples whose prompts the final model answers for the launch to show.
const SAMPLES: usize = 3;

/// Label of a token that is not trained (cross-entropy's ignore index).
const IGNORE: i64 = -100;

/// One tokenized example: its ids and which of them are trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub ids: Vec<i64>,
    pub trained: Vec<bool>,
}

impl SftExample {
    /// Tokens whose prediction is trained (targets are the ids shifted by one).
    fn trained_targets(&self) -> usize {
        self.trained.iter().skip(1).filter(|t| **t).count()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Pair { prompt: String, response: String },
    Chat { messages: Vec<ChatMessage> },
}

/// Reads and tokenizes a JSONL file; examples are cut to `max_len` tokens, and ones left with
/// nothing to train are dropped (the count is logged).
pub fn load_examples(path: &Path, tokenizer: &Tokenizer, max_len: usize) -> Result<Vec<SftExample>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Read { path: path.to_path_buf(), source })?;
    let mut examples = Vec::new();
    let mut dropped = 0;
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line_no = n + 1;
        let parsed: Line = serde_json::from_str(line).map_err(|source| DataError::Json {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        let mut ex = tokenize(parsed, tokenizer).map_err(|reason| DataError::Example {
            path: path.to_path_buf(),
            line: line_no,
            reason,
        })?;
        ex.ids.truncate(max_len);
        ex.trained.truncate(max_len);
        if ex.trained_targets() == 0 {
            dropped += 1;
            continue;
        }
        examples.push(ex);
    }
    if dropped > 0 {
        tracing::warn!(dropped, max_len, "examples with no response tokens within data.max_len were dropped");
    }
    if examples.is_empty() {
        return Err(DataError::NoExamples { path: path.to_path_buf() });
    }
    Ok(examples)
}

fn tokenize(line: Line, tok: &Tokenizer) -> Result<SftExample, String> {
    let mut ex = SftExample { ids: Vec::new(), trained: Vec::new() };
    let mut push = |ids: Vec<u32>, trained: bool| {
        ex.trained.extend(std::iter::repeat_n(trained, ids.len()));
        ex.ids.extend(ids.into_iter().map(i64::from));
    };
    let messages = match line {
        Line::Pair { prompt, response } if !tok.has_chat_template() => {
            push(tok.encode(&prompt, true).map_err(|e| e.to_string())?, false);
            push(tok.encode(&response, false).map_err(|e| e.to_string())?, true);
            if let Some(eos) = &tok.eos {
                push(vec![eos.id], true);
            }
            return Ok(ex);
        }
        Line::Pair { prompt, response } => {
            vec![
                ChatMessage { role: "user".into(), content: prompt },
                ChatMessage { role: "assistant".into(), content: response },
            ]
        }
        Line::Chat { messages } => messages,
    };
    // Render growing prefixes: the text each assistant message adds is trained, the rest not.
    let render = |upto: usize, generation_prompt: bool| {
        tok.apply_chat_template(&messages[..upto], generation_prompt).map_err(|e| e.to_string())
    };
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = render(i, true)?;
        let full = render(i + 1, false)?;
        let (Some(new_prompt), Some(answer)) = (prompt.strip_prefix(done.as_str()), full.strip_prefix(prompt.as_str()))
        else {
            return Err("the chat template does not render conversations as growing prefixes".into());
        };
        push(tok.encode(new_prompt, false).map_err(|e| e.to_string())?, false);
        push(tok.encode(answer, false).map_err(|e| e.to_string())?, true);
        done = full;
    }
    if ex.ids.is_empty() {
        return Err("no assistant message to train on".into());
    }
    Ok(ex)
}

pub struct SftTrainer {
    model: HfModel,
    tokenizer_dir: PathBuf,
    examples: Vec<SftExample>,
    pad: i64,
    /// The example order, epoch by epoch.
    order: Epochs,
    /// The global batch of the step being trained (every rank needs all of it to count the
    /// step's trained tokens).
    batch: (u64, Vec<SftExample>),
    /// Held-out examples, with `[eval]`.
    held_out: Vec<SftExample>,
}

impl SftTrainer {
    /// Fine-tuning of the model folder `model_dir`: its weights, or random ones (`random_init`).
    pub fn new(ctx: &TrainContext, model_dir: &Path, max_len: usize, random_init: bool) -> Result<Self, TrainError> {
        let model_error = |source| TrainError::Model { context: "model.path", source };
        let model =
            if random_init { HfModel::random(model_dir, ctx.device) } else { HfModel::load(model_dir, ctx.device) }
                .map_err(model_error)?;
        let tokenizer = Tokenizer::from_dir(model_dir).map_err(model_error)?;
        let limit = model.config.max_positions() as usize;
        if max_len > limit {
            return Err(TrainError::setting(
                "data.max_len",
                format!("{max_len} exceeds the model's {limit} positions"),
            ));
        }
        let source = match &ctx.spec.data {
            crate::config::DataSpec::File(path) => path.clone(),
            crate::config::DataSpec::Synthetic { .. } => return Err(DataError::NeedsFile.into()),
        };
        let mut examples = load_examples(&source, &tokenizer, max_len)?;
        let held_out = match ctx.spec.eval.as_ref().map(|e| &e.held_out) {
            None => Vec::new(),
            Some(HeldOut::Fraction(f)) => {
                let n = ((examples.len() as f64 * f).ceil() as usize).max(1);
                if n >= examples.len() {
                    return Err(TrainError::setting(
                        "data.eval_fraction",
                        format!("{f} of {} examples leaves none to train on", examples.len()),
                    ));
                }
                examples.split_off(examples.len() - n)
            }
            Some(HeldOut::File(path)) => load_examples(path, &tokenizer, max_len)
                .map_err(|e| TrainError::setting("data.eval_path", e.to_string()))?,
        };
        tracing::info!(
            examples = examples.len(),
            held_out = held_out.len(),
            source = %source.display(),
            "fine-tuning data"
        );
        let pad = tokenizer.pad.as_ref().or(tokenizer.eos.as_ref()).map_or(0, |s| i64::from(s.id));
        Ok(Self {
            order: Epochs::new(examples.len(), ctx.spec.seed),
            model,
            tokenizer_dir: model_dir.to_path_buf(),
            examples,
            pad,
            batch: (u64::MAX, Vec::new()),
            held_out,
        })
    }

    /// Example of global sample `sample` of step `step`: the examples in a seeded order,
    /// reshuffled every epoch, so a step's batch depends on (seed, step) alone.
    fn example(&mut self, step: u64, global: usize, sample: usize) -> SftExample {
        self.examples[self.order.example(step * global as u64 + sample as u64)].clone()
    }

    /// The global batch of step `step`.
    fn step_batch(&mut self, ctx: &TrainContext, step: u64) -> &[SftExample] {
        if self.batch.0 != step {
            let global = ctx.spec.global_batch;
            let all = (0..global).map(|s| self.example(step, global, s)).collect();
            self.batch = (step, all);
        }
        &self.batch.1
    }

    /// Inputs and targets `[n, T-1]` of a micro-batch, right-padded.
    fn inputs_and_targets(&self, examples: &[SftExample]) -> (Tensor, Tensor) {
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(2).max(2);
        let mut inputs = vec![self.pad; examples.len() * (t - 1)];
        let mut targets = vec![IGNORE; examples.len() * (t - 1)];
        for (r, e) in examples.iter().enumerate() {
            for j in 0..e.ids.len() - 1 {
                inputs[r * (t - 1) + j] = e.ids[j];
                if e.trained[j + 1] {
                    targets[r * (t - 1) + j] = e.ids[j + 1];
                }
            }
        }
        let shape = [examples.len() as i64, t as i64 - 1];
        (Tensor::from_slice(&inputs).view(shape), Tensor::from_slice(&targets).view(shape))
    }
}

impl TrainStep for SftTrainer {
    fn vars(&self) -> &VarStore {
        &self.model.vs
    }

    /// The architecture from the model folder's config.json (not data.max_len, which changes
    /// no parameter).
    fn fingerprint(&self) -> Fingerprint {
        self.model.config.architecture()
    }

    /// The loss is the mean over every trained token of the global batch.
    fn units(&mut self, ctx: &TrainContext, step: u64) -> Result<f64, TrainError> {
        Ok(self.step_batch(ctx, step).iter().map(|e| e.trained_targets()).sum::<usize>() as f64)
    }

    /// Cross-entropy summed over the trained tokens of held-out examples (taken in file order,
    /// batch after batch, wrapping around), and their number.
    fn eval_loss(
        &mut self,
        ctx: &TrainContext,
        batch: usize,
        samples: Range<usize>,
    ) -> Result<Option<(f64, f64)>, TrainError> {
        if self.held_out.is_empty() {
            return Ok(None);
        }
        let global = ctx.spec.global_batch;
        let part: Vec<SftExample> =
            samples.map(|s| self.held_out[(batch * global + s) % self.held_out.len()].clone()).collect();
        let units = part.iter().map(|e| e.trained_targets()).sum::<usize>() as f64;
        let summed = self.summed_loss(ctx, &part);
        Ok(Some((summed.f_double_value(&[])?, units)))
    }

    /// Cross-entropy summed over the micro-batch's trained tokens; its tokens are the examples'
    /// real ones (padding excluded).
    fn loss(&mut self, ctx: &TrainContext, step: u64, samples: Range<usize>) -> Result<MicroLoss, TrainError> {
        self.step_batch(ctx, step);
        let part = &self.batch.1[samples];
        let tokens = part.iter().map(|e| e.ids.len()).sum::<usize>();
        let summed = self.summed_loss(ctx, part);
        Ok(MicroLoss::sum(summed).with_tokens(tokens))
    }

    /// Rank 0 exports the fine-tuned model and its tokenizer as a Hugging Face folder.
    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        if ctx.rank != 0 {
            return Ok(());
        }
        export_model(&self.model, &self.tokenizer_dir, &ctx.run_dir.join("model"))?;
        self.write_samples(ctx)
    }
}

impl SftTrainer {
    /// Cross-entropy of `examples` summed over their trained tokens.
    fn summed_loss(&self, ctx: &TrainContext, examples: &[SftExample]) -> Tensor {
        let (inputs, targets) = self.inputs_and_targets(examples);
        let logits = self.model.logits(&inputs.to_device(ctx.device));
        let vocab = logits.size()[2];
        logits.view([-1, vocab]).to_kind(Kind::Float).cross_entropy_loss(
            &targets.to_device(ctx.device).view([-1]),
            None::<Tensor>,
            Reduction::Sum,
            IGNORE,
            0.0,
        )
    }

    /// The exported model's greedy answers to the first examples' prompts, beside the taught
    /// ones (`<run>/samples.json`, which the launch prints).
    fn write_samples(&self, ctx: &TrainContext) -> Result<(), TrainError> {
        let tokenizer = Tokenizer::from_dir(&self.tokenizer_dir)
            .map_err(|source| TrainError::Model { context: "model.path", source })?;
        let first: Vec<&SftExample> = self.examples.iter().take(SAMPLES).collect();
        // The prompt: the tokens before the first trained one.
        let prompt_of = |e: &SftExample| -> Vec<u32> {
            e.ids.iter().zip(&e.trained).take_while(|(_, t)| !**t).map(|(&id, _)| id as u32).collect()
        };
        let prompts: Vec<Vec<u32>> = first.iter().map(|e| prompt_of(e)).collect();
        let max_new_tokens = first.iter().map(|e| e.ids.len()).max().unwrap_or(1) + 4;
        let params = crate::hf::SamplingParams { max_new_tokens, temperature: 0.0, ..Default::default() };
        let outputs = crate::hf::generate(&self.model, &tokenizer, &prompts, &params)
            .map_err(|source| TrainError::Model { context: "samples", source })?;
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let samples: Vec<Sample> = first
            .iter()
            .zip(&prompts)
            .zip(&outputs)
            .map(|((e, p), g)| {
                let taught: Vec<u32> = e.ids[p.len()..].iter().map(|&id| id as u32).collect();
                Sample { prompt: decode(p), response: g.text.clone(), expected: Some(decode(&taught)) }
            })
            .collect();
        write_samples(&ctx.run_dir, &samples)
    }
}

/// Writes `model` with the tokenizer files of `tokenizer_dir` as a Hugging Face folder `out`.
pub fn export_model(model: &HfModel, tokenizer_dir: &Path, out: &Path) -> Result<(), TrainError> {
    model.save(out, Kind::Float, 2 << 30).map_err(|source| TrainError::Model { context: "export", source })?;
    copy_tokenizer_files(tokenizer_dir, out)?;
    tracing::info!(model = %out.display(), "model exported");
    Ok(())
}

/// Copies the tokenizer and generation files of model folder `from` into `out`.
pub fn copy_tokenizer_files(from: &Path, out: &Path) -> Result<(), TrainError> {
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = from.join(file);
        if src.exists() {
            std::fs::copy(&src, out.join(file)).map_err(|source| TrainError::Io { path: src.clone(), source })?;
        }
    }
    Ok(())
}
