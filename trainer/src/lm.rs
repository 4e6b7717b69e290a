//! The built-in trainer: a GPT-style byte-level language model, trained by the [`Engine`] (DDP,
//! AdamW, warm-up + cosine LR, global gradient clipping) like any user's [`TrainStep`].
//!
//! [`Engine`]: crate::engine::Engine

use std::ops::Range;

use tch::nn::VarStore;

use crate::config::{DataSpec, HeldOut, JobSpec};
use crate::data::{BatchPlan, ByteCorpus};
use crate::engine::{MicroLoss, TrainStep};
use crate::model::{Gpt, GptConfig};
use crate::train_loop::{Fingerprint, Sample, TrainContext, TrainError, write_samples};

/// Bytes the final model generates for the launch to show.
const SAMPLE_BYTES: usize = 64;

pub struct LmTrainer {
    vs: VarStore,
    model: Gpt,
    corpus: ByteCorpus,
    plan: BatchPlan,
    /// The held-out bytes and their windows, with `[eval]`.
    held_out: Option<(ByteCorpus, BatchPlan)>,
}

/// Mixed into the seed of the held-out windows, so they are not the training steps' windows.
const EVAL_SEED_SALT: u64 = 0x6576_616c;

impl LmTrainer {
    pub fn new(ctx: &TrainContext) -> Result<Self, TrainError> {
        let spec = &ctx.spec;
        let (corpus, held_out) = match spec.eval.as_ref().map(|e| &e.held_out) {
            None => (load_corpus(spec)?, None),
            Some(HeldOut::Fraction(f)) => {
                let (train, held_out) = load_corpus(spec)?.split_tail(*f);
                (train, Some(("data.eval_fraction", held_out)))
            }
            Some(HeldOut::File(path)) => {
                let held_out =
                    ByteCorpus::from_file(path).map_err(|e| TrainError::setting("data.eval_path", e.to_string()))?;
                (load_corpus(spec)?, Some(("data.eval_path", held_out)))
            }
        };
        let plan = BatchPlan { seed: spec.seed, seq_len: spec.model.n_ctx as usize, global_batch: spec.global_batch };
        plan.check(&corpus)?;
        let held_out = match held_out {
            Some((key, bytes)) => {
                let eval_plan = BatchPlan { seed: spec.seed ^ EVAL_SEED_SALT, ..plan };
                if eval_plan.check(&bytes).is_err() {
                    return Err(TrainError::setting(
                        key,
                        format!(
                            "{} has {} bytes, fewer than one window of model.n_ctx + 1 = {}: hold out more",
                            bytes.source(),
                            bytes.len(),
                            plan.seq_len + 1
                        ),
                    ));
                }
                Some((bytes, eval_plan))
            }
            None => None,
        };
        let vs = VarStore::new(ctx.device);
        let m = spec.model;
        let config = GptConfig {
            vocab_size: m.vocab_size,
            n_ctx: m.n_ctx,
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_embd: m.n_embd,
        };
        let model = config.init(&vs.root());
        Ok(Self { vs, model, corpus, plan, held_out })
    }
}

fn load_corpus(spec: &JobSpec) -> Result<ByteCorpus, TrainError> {
    match &spec.data {
        DataSpec::Synthetic { bytes } => Ok(ByteCorpus::synthetic(spec.seed, *bytes)),
        DataSpec::File(path) => Ok(ByteCorpus::from_file(path)?),
    }
}

impl TrainStep for LmTrainer {
    fn vars(&self) -> &VarStore {
        &self.vs
    }

    /// The GPT's dimensions, keyed like the `[model]` config section.
    fn fingerprint(&self) -> Fingerprint {
        let c = self.model.config();
        [
            ("n_layer", c.n_layer),
            ("n_head", c.n_head),
            ("n_embd", c.n_embd),
            ("n_ctx", c.n_ctx),
            ("vocab_size", c.vocab_size),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect()
    }

    /// Rank 0 exports the trained model as a Hugging Face GPT-2 folder (`<run>/model`, its
    /// tokenizer the 256 bytes), and lets it continue the corpus's first bytes greedily, for the
    /// launch to show (`<run>/samples.json`).
    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        if !ctx.is_rank_zero() {
            return Ok(());
        }
        crate::hf::export_gpt2(&self.vs, self.model.config(), &ctx.run_dir.join("model"))
            .map_err(|source| TrainError::Model { context: "the exported model", source })?;
        let n_ctx = self.model.config().n_ctx as usize;
        let prompt: Vec<u8> = self.corpus.bytes().iter().take(n_ctx.min(32)).copied().collect();
        let mut ids: Vec<i64> = prompt.iter().map(|&b| i64::from(b)).collect();
        tch::no_grad(|| {
            for _ in 0..SAMPLE_BYTES {
                let window = &ids[ids.len().saturating_sub(n_ctx)..];
                let input = tch::Tensor::from_slice(window).view([1, -1]).to_device(ctx.device);
                let logits = self.model.forward(&input);
                ids.push(logits.select(1, -1).argmax(-1, false).int64_value(&[0]));
            }
        });
        let text =
            |ids: &[i64]| String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned();
        let sample =
            Sample { prompt: text(&ids[..prompt.len()]), response: text(&ids[prompt.len()..]), expected: None };
        write_samples(&ctx.run_dir, &[sample])
    }

    /// Next-byte loss of held-out windows, summed over them (each window's mean over its bytes,
    /// as in training).
    fn eval_loss(
        &mut self,
        ctx: &TrainContext,
        batch: usize,
        samples: Range<usize>,
    ) -> Result<Option<(f64, f64)>, TrainError> {
        let Some((bytes, plan)) = &self.held_out else { return Ok(None) };
        let n = samples.len();
        let (inputs, targets) = plan.micro_batch(bytes, batch as u64, samples);
        let loss = self.model.loss(&inputs.to_device(ctx.device), &targets.to_device(ctx.device));
        Ok(Some((loss.f_double_value(&[])? * n as f64, n as f64)))
    }

    /// Mean next-byte loss over the micro-batch's windows.
    fn loss(&mut self, ctx: &TrainContext, step: u64, samples: Range<usize>) -> Result<MicroLoss, TrainError> {
        let n = samples.len();
        let (inputs, targets) = self.plan.micro_batch(&self.corpus, step, samples);
        let loss = self.model.loss(&inputs.to_device(ctx.device), &targets.to_device(ctx.device));
        Ok(MicroLoss::mean(loss, n).with_tokens(n * self.plan.seq_len))
    }
}
