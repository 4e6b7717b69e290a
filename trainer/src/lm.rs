//! The built-in trainer: a GPT-style byte-level language model trained with DDP, AdamW,
//! warm-up + cosine LR and global gradient clipping. It is a [`TrainLoop`] like any user's.

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::collective::ReduceOp;
use crate::config::{DataSpec, JobSpec};
use crate::data::{BatchPlan, ByteCorpus};
use crate::ddp::Ddp;
use crate::model::{Gpt, GptConfig};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::train_loop::{StepOutput, TrainContext, TrainError, TrainLoop};

pub struct LmTrainer {
    // Owns the variables the model and the flat buffers view.
    _vs: VarStore,
    model: Gpt,
    ddp: Ddp,
    optimizer: AdamW,
    schedule: LrSchedule,
    corpus: ByteCorpus,
    plan: BatchPlan,
}

impl LmTrainer {
    pub fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let spec = &ctx.spec;
        let corpus = load_corpus(spec)?;
        let seq_len = spec.model.n_ctx as usize;
        if corpus.len() < seq_len + 2 {
            return Err(TrainError::other(format!(
                "the corpus has {} bytes; model.n_ctx {} needs at least {}",
                corpus.len(),
                seq_len,
                seq_len + 2
            )));
        }
        let vs = VarStore::new(ctx.device);
        let m = spec.model;
        let config = GptConfig { vocab_size: m.vocab_size, n_ctx: m.n_ctx, n_layer: m.n_layer, n_head: m.n_head, n_embd: m.n_embd };
        let model = config.init(&vs.root());
        let ddp = Ddp::new(&vs, ctx.collective.as_mut(), spec.bucket_bytes)?;
        let o = spec.optim;
        let optimizer = AdamW::new(
            AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: 1e-8, weight_decay: o.weight_decay },
            ddp.params(),
        );
        let schedule = LrSchedule { base_lr: o.lr, min_lr: o.min_lr, warmup_steps: o.warmup_steps, total_steps: spec.steps };
        let plan = BatchPlan { seed: spec.seed, seq_len, global_batch: spec.global_batch };
        Ok(Self { _vs: vs, model, ddp, optimizer, schedule, corpus, plan })
    }
}

fn load_corpus(spec: &JobSpec) -> Result<ByteCorpus, TrainError> {
    match &spec.data {
        DataSpec::Synthetic { bytes } => Ok(ByteCorpus::synthetic(spec.seed, *bytes)),
        DataSpec::File(path) => ByteCorpus::from_file(path).map_err(|e| TrainError::other(format!("data.source: {e}"))),
    }
}

impl TrainLoop for LmTrainer {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        let spec = &ctx.spec;
        let (micro, accum) = (spec.micro_batch, spec.grad_accum);
        let lr = self.schedule.lr_at(step);
        let mut loss_sum = 0.0;
        for m in 0..accum {
            // Micro-batch m of rank r holds global samples [(m·W + r)·micro, +micro): any
            // (workers, grad_accum) split with the same global batch sees the same samples.
            let start = (m * ctx.world_size + ctx.rank) * micro;
            let (inputs, targets) = self.plan.micro_batch(&self.corpus, step, start..start + micro);
            let loss = self.model.loss(&inputs.to_device(ctx.device), &targets.to_device(ctx.device));
            (&loss / accum as f64).f_backward()?;
            loss_sum += loss.f_double_value(&[])?;
        }
        self.ddp.sync_grads(ctx.collective.as_mut())?;
        let params = self.ddp.params_mut();
        let grad_norm = if spec.optim.grad_clip > 0.0 {
            params.clip_grad_norm(spec.optim.grad_clip)
        } else {
            params.grads().f_norm()?.f_double_value(&[])?
        };
        self.optimizer.step(params, lr);
        params.zero_grads();

        let mut loss = Tensor::from_slice(&[loss_sum / accum as f64]).to_kind(Kind::Float).to_device(ctx.device);
        ctx.collective.all_reduce(&mut loss, ReduceOp::Avg)?;
        Ok(StepOutput {
            loss: loss.f_double_value(&[0])?,
            lr,
            tokens: spec.tokens_per_step,
            grad_norm: Some(grad_norm),
        })
    }
}
