//! The built-in trainer: a GPT-style byte-level language model trained with DDP, AdamW,
//! warm-up + cosine LR and global gradient clipping. It is a [`TrainLoop`] like any user's.

use std::collections::HashMap;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::collective::ReduceOp;
use crate::config::{DataSpec, JobSpec};
use crate::data::{BatchPlan, ByteCorpus};
use crate::ddp::Ddp;
use crate::model::{Gpt, GptConfig};
use crate::optim::{AdamW, AdamWConfig, FlatEntry, LrSchedule};
use crate::train_loop::{LoopState, StepOutput, TrainContext, TrainError, TrainLoop};

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
        let (micro, accum, global) = (spec.micro_batch, spec.grad_accum, spec.global_batch);
        let world = ctx.world_size;
        let lr = self.schedule.lr_at(step);
        let mut loss_sum = 0.0;
        for m in 0..accum {
            // Micro-batch m of rank r holds global samples [(m·W + r)·micro, +micro), cut at the
            // global batch: any (workers, grad_accum) split of the same global batch sees the
            // same samples. Each micro-batch's mean loss is weighted by its share of the global
            // batch (times W, undone by the averaging all-reduce), so uneven splits are exact.
            let start = ((m * world + ctx.rank) * micro).min(global);
            let end = (start + micro).min(global);
            if start == end {
                continue;
            }
            let weight = ((end - start) * world) as f64 / global as f64;
            let (inputs, targets) = self.plan.micro_batch(&self.corpus, step, start..end);
            let loss = self.model.loss(&inputs.to_device(ctx.device), &targets.to_device(ctx.device));
            (&loss * weight).f_backward()?;
            loss_sum += loss.f_double_value(&[])? * weight;
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

        let mut loss = Tensor::from_slice(&[loss_sum]).to_kind(Kind::Float).to_device(ctx.device);
        ctx.collective.all_reduce(&mut loss, ReduceOp::Avg)?;
        Ok(StepOutput {
            loss: loss.f_double_value(&[0])?,
            lr,
            tokens: spec.tokens_per_step,
            grad_norm: Some(grad_norm),
        })
    }

    /// Parameters under their Hugging Face GPT-2 names; AdamW moments as `exp_avg.<name>` and
    /// `exp_avg_sq.<name>`. One copy of each flat buffer, then views of the copies.
    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        let flat = self.ddp.params();
        let snapshot = |buf: &Tensor| -> Result<Tensor, TrainError> { Ok(buf.f_to_device(Device::Cpu)?.f_detach_copy()?) };
        let (params, exp_avg, exp_avg_sq) =
            (snapshot(flat.params())?, snapshot(self.optimizer.exp_avg())?, snapshot(self.optimizer.exp_avg_sq())?);
        let mut state = LoopState { extra: serde_json::json!({ "optimizer_step": self.optimizer.step_count() }), ..Default::default() };
        for entry in flat.entries() {
            state.model.push((entry.name.clone(), flat.view(&params, entry)));
            state.optimizer.push((format!("exp_avg.{}", entry.name), flat.view(&exp_avg, entry)));
            state.optimizer.push((format!("exp_avg_sq.{}", entry.name), flat.view(&exp_avg_sq, entry)));
        }
        Ok(Some(state))
    }

    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        let flat = self.ddp.params();
        let model: HashMap<String, Tensor> = state.model.into_iter().collect();
        let optimizer: HashMap<String, Tensor> = state.optimizer.into_iter().collect();
        check_names("model.safetensors", flat.entries(), &model, "")?;
        check_names("optimizer.safetensors", flat.entries(), &optimizer, "exp_avg.")?;
        check_names("optimizer.safetensors", flat.entries(), &optimizer, "exp_avg_sq.")?;
        let device = flat.params().device();
        let flatten = |map: &HashMap<String, Tensor>, prefix: &str| -> Result<Tensor, TrainError> {
            let parts: Vec<Tensor> = flat.entries().iter().map(|e| map[&format!("{prefix}{}", e.name)].reshape([-1])).collect();
            Ok(Tensor::f_cat(&parts, 0)?.f_to_kind(Kind::Float)?.f_to_device(device)?)
        };
        let (params, exp_avg, exp_avg_sq) = (flatten(&model, "")?, flatten(&optimizer, "exp_avg.")?, flatten(&optimizer, "exp_avg_sq.")?);
        let mut target = flat.params().shallow_clone();
        tch::no_grad(|| target.f_copy_(&params))?;
        let optimizer_step = state.extra.get("optimizer_step").and_then(|v| v.as_u64()).ok_or_else(|| {
            TrainError::other("trainer_state.json: extra.optimizer_step is missing (not a checkpoint of the built-in trainer)")
        })?;
        self.optimizer.restore(optimizer_step, &exp_avg, &exp_avg_sq);
        Ok(())
    }
}

/// Refuses a checkpoint whose tensors are not exactly the model's: names every missing,
/// unexpected or differently shaped tensor.
fn check_names(file: &str, entries: &[FlatEntry], tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<(), TrainError> {
    let mut problems = Vec::new();
    for e in entries {
        let name = format!("{prefix}{}", e.name);
        match tensors.get(&name) {
            None => problems.push(format!("missing {name}")),
            Some(t) if t.size() != e.shape => problems.push(format!("{name} has shape {:?}, the model {:?}", t.size(), e.shape)),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<String> = entries.iter().map(|e| format!("{prefix}{}", e.name)).collect();
    if prefix.is_empty() {
        let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
        unexpected.sort();
        problems.extend(unexpected.into_iter().map(|k| format!("unexpected {k}")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.sort();
        Err(TrainError::other(format!("the checkpoint's {file} does not match the model: {}", problems.join("; "))))
    }
}
