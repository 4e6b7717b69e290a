//! What every built-in data-parallel trainer does around its forward and backward passes: DDP
//! gradient averaging, global-norm clipping, AdamW with the warm-up + cosine schedule, and the
//! checkpointable state of all of it.

use std::collections::HashMap;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::JobSpec;
use crate::ddp::Ddp;
use crate::optim::{AdamW, AdamWConfig, FlatEntry, LrSchedule};
use crate::train_loop::{LoopState, TrainContext, TrainError};

pub struct DpOptimizer {
    ddp: Ddp,
    optimizer: AdamW,
    schedule: LrSchedule,
    grad_clip: f64,
}

impl DpOptimizer {
    /// Flattens the trainable variables of `vs` and starts every rank from rank 0's values.
    pub fn new(vs: &VarStore, ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let spec: &JobSpec = &ctx.spec;
        let ddp = Ddp::new(vs, ctx.collective.as_mut(), spec.bucket_bytes)?;
        let o = spec.optim;
        let optimizer = AdamW::new(
            AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: 1e-8, weight_decay: o.weight_decay },
            ddp.params(),
        );
        let schedule =
            LrSchedule { base_lr: o.lr, min_lr: o.min_lr, warmup_steps: o.warmup_steps, total_steps: spec.steps };
        Ok(Self { ddp, optimizer, schedule, grad_clip: o.grad_clip })
    }

    /// The learning rate of optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.schedule.lr_at(step)
    }

    /// After the backward passes of a step: averages the gradients across ranks, clips them,
    /// updates the parameters at `lr` and clears the gradients. Returns the global gradient norm
    /// before clipping.
    pub fn step(&mut self, ctx: &mut TrainContext, lr: f64) -> Result<f64, TrainError> {
        self.ddp.sync_grads(ctx.collective.as_mut())?;
        let params = self.ddp.params_mut();
        let grad_norm = if self.grad_clip > 0.0 {
            params.clip_grad_norm(self.grad_clip)
        } else {
            params.grads().f_norm()?.f_double_value(&[])?
        };
        self.optimizer.step(params, lr);
        params.zero_grads();
        Ok(grad_norm)
    }

    /// Parameters under their variable names (Hugging Face names for the built-in models);
    /// AdamW moments as `exp_avg.<name>` and `exp_avg_sq.<name>`. One copy of each flat buffer,
    /// then views of the copies.
    pub fn state(&self) -> Result<LoopState, TrainError> {
        let flat = self.ddp.params();
        let snapshot =
            |buf: &Tensor| -> Result<Tensor, TrainError> { Ok(buf.f_to_device(Device::Cpu)?.f_detach_copy()?) };
        let (params, exp_avg, exp_avg_sq) =
            (snapshot(flat.params())?, snapshot(self.optimizer.exp_avg())?, snapshot(self.optimizer.exp_avg_sq())?);
        let mut state = LoopState {
            extra: serde_json::json!({ "optimizer_step": self.optimizer.step_count() }),
            ..Default::default()
        };
        for entry in flat.entries() {
            state.model.push((entry.name.clone(), flat.view(&params, entry)));
            state.optimizer.push((format!("exp_avg.{}", entry.name), flat.view(&exp_avg, entry)));
            state.optimizer.push((format!("exp_avg_sq.{}", entry.name), flat.view(&exp_avg_sq, entry)));
        }
        Ok(state)
    }

    /// Restores a state from [`DpOptimizer::state`], refusing one of another model.
    pub fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        let flat = self.ddp.params();
        let model: HashMap<String, Tensor> = state.model.into_iter().collect();
        let optimizer: HashMap<String, Tensor> = state.optimizer.into_iter().collect();
        check_names("model.safetensors", flat.entries(), &model, "")?;
        check_names("optimizer.safetensors", flat.entries(), &optimizer, "exp_avg.")?;
        check_names("optimizer.safetensors", flat.entries(), &optimizer, "exp_avg_sq.")?;
        let device = flat.params().device();
        let flatten = |map: &HashMap<String, Tensor>, prefix: &str| -> Result<Tensor, TrainError> {
            let parts: Vec<Tensor> =
                flat.entries().iter().map(|e| map[&format!("{prefix}{}", e.name)].reshape([-1])).collect();
            Ok(Tensor::f_cat(&parts, 0)?.f_to_kind(Kind::Float)?.f_to_device(device)?)
        };
        let (params, exp_avg, exp_avg_sq) =
            (flatten(&model, "")?, flatten(&optimizer, "exp_avg.")?, flatten(&optimizer, "exp_avg_sq.")?);
        let mut target = flat.params().shallow_clone();
        tch::no_grad(|| target.f_copy_(&params))?;
        let optimizer_step = state.extra.get("optimizer_step").and_then(|v| v.as_u64()).ok_or_else(|| {
            TrainError::other(
                "trainer_state.json: extra.optimizer_step is missing (not a checkpoint of a built-in trainer)",
            )
        })?;
        self.optimizer.restore(optimizer_step, &exp_avg, &exp_avg_sq);
        Ok(())
    }
}

/// Refuses a checkpoint whose tensors are not exactly the model's: names every missing,
/// unexpected or differently shaped tensor.
fn check_names(
    file: &'static str,
    entries: &[FlatEntry],
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
) -> Result<(), TrainError> {
    let mut problems = Vec::new();
    for e in entries {
        let name = format!("{prefix}{}", e.name);
        match tensors.get(&name) {
            None => problems.push(format!("missing {name}")),
            Some(t) if t.size() != e.shape => {
                problems.push(format!("{name} has shape {:?}, the model {:?}", t.size(), e.shape))
            }
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
        Err(TrainError::StateMismatch { file, problems })
    }
}
