//! The built-in trainer: a GPT-style byte-level language model trained with DDP, AdamW,
//! warm-up + cosine LR and global gradient clipping. It is a [`TrainLoop`] like any user's.

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::collective::ReduceOp;
use crate::config::{DataSpec, JobSpec};
use crate::data::{BatchPlan, ByteCorpus, rank_samples};
use crate::dp_optim::DpOptimizer;
use crate::model::{Gpt, GptConfig};
use crate::train_loop::{LoopState, StepOutput, TrainContext, TrainError, TrainLoop};

pub struct LmTrainer {
    // Owns the variables the model and the flat buffers view.
    _vs: VarStore,
    model: Gpt,
    optim: DpOptimizer,
    corpus: ByteCorpus,
    plan: BatchPlan,
}

impl LmTrainer {
    pub fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let spec = &ctx.spec;
        let corpus = load_corpus(spec)?;
        let seq_len = spec.model.n_ctx as usize;
        let plan = BatchPlan { seed: spec.seed, seq_len, global_batch: spec.global_batch };
        plan.check(&corpus)?;
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
        let optim = DpOptimizer::new(&vs, ctx)?;
        Ok(Self { _vs: vs, model, optim, corpus, plan })
    }
}

fn load_corpus(spec: &JobSpec) -> Result<ByteCorpus, TrainError> {
    match &spec.data {
        DataSpec::Synthetic { bytes } => Ok(ByteCorpus::synthetic(spec.seed, *bytes)),
        DataSpec::File(path) => Ok(ByteCorpus::from_file(path)?),
    }
}

impl TrainLoop for LmTrainer {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        let spec = &ctx.spec;
        let (micro, accum, global) = (spec.micro_batch, spec.grad_accum, spec.global_batch);
        let world = ctx.world_size;
        let lr = self.optim.lr_at(step);
        let mut loss_sum = 0.0;
        for m in 0..accum {
            // Each micro-batch's mean loss is weighted by its share of the global batch (times
            // W, undone by the averaging all-reduce), so uneven splits are exact.
            let samples = rank_samples(m, ctx.rank, world, micro, global);
            if samples.is_empty() {
                continue;
            }
            let weight = (samples.len() * world) as f64 / global as f64;
            let (inputs, targets) = self.plan.micro_batch(&self.corpus, step, samples);
            let loss = self.model.loss(&inputs.to_device(ctx.device), &targets.to_device(ctx.device));
            (&loss * weight).f_backward()?;
            loss_sum += loss.f_double_value(&[])? * weight;
        }
        let tokens = spec.tokens_per_step;
        let grad_norm = self.optim.step(ctx, lr)?;

        let mut loss = Tensor::from_slice(&[loss_sum]).to_kind(Kind::Float).to_device(ctx.device);
        ctx.collective.all_reduce(&mut loss, ReduceOp::Avg)?;
        Ok(StepOutput { loss: loss.f_double_value(&[0])?, lr, tokens, grad_norm: Some(grad_norm) })
    }

    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        self.optim.state().map(Some)
    }

    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        self.optim.restore(state)
    }
}
