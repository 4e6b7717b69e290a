//! [`Engine`]: DDP, micro-batch accumulation, clipping and AdamW for one rank's model.

use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::weights::{WeightVersion, Weights};
use crate::collective::{Collective, ReduceOp};
use crate::config::JobSpec;
use crate::ddp::Ddp;
use crate::optim::{AdamW, AdamWConfig, FlatParams, LrSchedule};
use crate::precision::{Precision, autocast};
use crate::train_loop::{StepOutput, TrainContext, TrainError};

/// How the engine optimizes: AdamW's hyper-parameters, the learning-rate schedule, clipping, the
/// DDP bucket size and the forward passes' precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    pub adamw: AdamWConfig,
    pub schedule: LrSchedule,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Gradients are all-reduced in buckets of this many bytes.
    pub bucket_bytes: usize,
    /// The arithmetic of [`Engine::forward`]; parameters, gradients and optimizer state stay
    /// float32 whatever it is.
    pub precision: Precision,
}

impl EngineConfig {
    /// The job's `[train]` settings: AdamW (eps 1e-8) with linear warm-up then cosine decay over
    /// `train.steps`, `train.grad_clip`, `train.bucket_mb` and `train.precision`.
    pub fn from_spec(spec: &JobSpec) -> Self {
        let o = spec.optim;
        Self {
            adamw: AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: 1e-8, weight_decay: o.weight_decay },
            schedule: LrSchedule {
                base_lr: o.lr,
                min_lr: o.min_lr,
                warmup_steps: o.warmup_steps,
                total_steps: spec.steps,
            },
            grad_clip: o.grad_clip,
            bucket_bytes: spec.bucket_bytes,
            precision: spec.precision,
        }
    }
}

/// The loss of one micro-batch, and how much of the step's loss it stands for.
///
/// The loss of a step is the sum of `loss × weight` over every micro-batch of every rank,
/// divided by the step's unit count (samples or tokens of the global batch). So a loss averaged
/// over the micro-batch's `n` samples has weight `n`, and a loss summed over its tokens weight 1;
/// either way an uneven split of the global batch gives the same step as one big batch.
#[derive(Debug)]
pub struct MicroLoss {
    /// A scalar with a graph to the model's parameters.
    pub loss: Tensor,
    pub weight: f64,
    /// Tokens the micro-batch processed, for the throughput metric (0 if not counted).
    pub tokens: usize,
}

impl MicroLoss {
    /// A loss averaged over `count` units (samples or tokens) of the micro-batch.
    pub fn mean(loss: Tensor, count: usize) -> Self {
        Self { loss, weight: count as f64, tokens: 0 }
    }

    /// A loss summed over the units of the micro-batch.
    pub fn sum(loss: Tensor) -> Self {
        Self { loss, weight: 1.0, tokens: 0 }
    }

    /// The same loss, counting `tokens` processed tokens.
    pub fn with_tokens(self, tokens: usize) -> Self {
        Self { tokens, ..self }
    }
}

/// One rank's share of data-parallel training of a model: its flat parameter and gradient
/// buffers, the optimizer state and the losses accumulated since the last optimizer step.
pub struct Engine {
    pub(super) ddp: Ddp,
    pub(super) optimizer: AdamW,
    schedule: LrSchedule,
    grad_clip: f64,
    precision: Precision,
    world_size: usize,
    /// This rank's `Σ loss × scale` and tokens since the last optimizer step.
    pending_loss: f64,
    pending_tokens: usize,
    /// The step's gradients are averaged already ([`Engine::backward_and_sync`]).
    synced: bool,
}

impl Engine {
    /// Flattens the trainable variables of `vs` (build it after the model, before any forward
    /// pass) and starts every rank from rank 0's values (sync point).
    pub fn new(vs: &VarStore, collective: &mut dyn Collective, config: EngineConfig) -> Result<Self, TrainError> {
        let ddp = Ddp::new(vs, collective, config.bucket_bytes)?;
        let optimizer = AdamW::new(config.adamw, ddp.params());
        Ok(Self {
            ddp,
            optimizer,
            schedule: config.schedule,
            grad_clip: config.grad_clip,
            precision: config.precision,
            world_size: collective.world_size(),
            pending_loss: 0.0,
            pending_tokens: 0,
            synced: false,
        })
    }

    /// An engine configured by the job (see [`EngineConfig::from_spec`]) on the context's gang.
    pub fn for_job(vs: &VarStore, ctx: &mut TrainContext) -> Result<Self, TrainError> {
        Self::new(vs, ctx.collective.as_mut(), EngineConfig::from_spec(&ctx.spec))
    }

    /// The learning rate of optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.schedule.lr_at(step)
    }

    /// Runs a forward pass `f` in the job's precision: under bf16 autocast for `train.precision =
    /// "bf16"` (matmuls in bf16 from the float32 weights, reductions and losses in float32), as is
    /// for `"fp32"`. Call [`Engine::backward`] outside it, as autocast wants.
    pub fn forward<T>(&self, f: impl FnOnce() -> T) -> Result<T, TrainError> {
        Ok(autocast(self.precision, self.device(), f)?)
    }

    /// Back-propagates one micro-batch's loss, scaled by its share of the step's `units`
    /// (samples or tokens of the global batch, the same on every rank; see [`MicroLoss`]), and
    /// adds it to the step's reported loss. Returns the micro-batch's own loss. For the step's
    /// last micro-batch, [`Engine::backward_and_sync`] is faster.
    pub fn backward(&mut self, micro: MicroLoss, units: f64) -> Result<f64, TrainError> {
        let scaled = self.scaled(&micro, units)?;
        scaled.f_backward()?;
        self.account(&micro, units)
    }

    /// As [`Engine::backward`], for the step's last micro-batch on this rank: averages the
    /// gradients across ranks while backward runs (each bucket of the flat gradient buffer as
    /// soon as backward has finished it), so little of the all-reduce is left for
    /// [`Engine::optimizer_step`]. Sync point, in place of the one in `optimizer_step`; a rank
    /// whose last micro-batch is empty calls `optimizer_step` alone and syncs there.
    pub fn backward_and_sync(
        &mut self,
        micro: MicroLoss,
        units: f64,
        collective: &mut dyn Collective,
    ) -> Result<f64, TrainError> {
        let scaled = self.scaled(&micro, units)?;
        let (backward, synced) = self.ddp.sync_grads_during(collective, &scaled, || scaled.f_backward());
        // Every bucket was all-reduced (or failed to be), even when backward failed: the step's
        // sync is spent either way.
        self.synced = true;
        backward?;
        synced?;
        self.account(&micro, units)
    }

    /// The micro-batch's share of the step (× W: the gradient all-reduce averages over the W
    /// ranks, and the step's loss is a sum).
    fn scale(&self, micro: &MicroLoss, units: f64) -> f64 {
        micro.weight * self.world_size as f64 / units
    }

    /// The loss to back-propagate, refused once the step's gradients are synced.
    fn scaled(&self, micro: &MicroLoss, units: f64) -> Result<Tensor, TrainError> {
        if self.synced {
            return Err(TrainError::other(
                "a backward pass after Engine::backward_and_sync in the same step: its gradients would miss the \
                 other ranks; call backward_and_sync for the step's last micro-batch only",
            ));
        }
        Ok(&micro.loss * self.scale(micro, units))
    }

    fn account(&mut self, micro: &MicroLoss, units: f64) -> Result<f64, TrainError> {
        let scale = self.scale(micro, units);
        let loss = micro.loss.f_double_value(&[])?;
        self.pending_loss += loss * scale;
        self.pending_tokens += micro.tokens;
        Ok(loss)
    }

    /// Ends optimizer step `step` (sync point: every rank calls it once per step): averages the
    /// accumulated gradients across ranks (unless [`Engine::backward_and_sync`] did), clips them,
    /// updates the parameters with AdamW at the schedule's learning rate, clears the gradients and
    /// bumps the [`WeightVersion`]. Returns the step's loss over the global batch and its tokens,
    /// the same on every rank.
    pub fn optimizer_step(&mut self, collective: &mut dyn Collective, step: u64) -> Result<StepOutput, TrainError> {
        let lr = self.schedule.lr_at(step);
        if !std::mem::take(&mut self.synced) {
            self.ddp.sync_grads(collective)?;
        }
        let params = self.ddp.params_mut();
        let grad_norm = if self.grad_clip > 0.0 {
            params.clip_grad_norm(self.grad_clip)
        } else {
            params.grads().f_norm()?.f_double_value(&[])?
        };
        self.optimizer.step(params, lr);
        params.zero_grads();

        let local = [std::mem::take(&mut self.pending_loss), std::mem::take(&mut self.pending_tokens) as f64];
        let mut reduced = Tensor::from_slice(&local).f_to_device(self.device())?;
        collective.all_reduce(&mut reduced, ReduceOp::Sum)?;
        let reduced = Vec::<f64>::try_from(reduced.f_to_device(Device::Cpu)?)?;
        Ok(StepOutput {
            loss: reduced[0] / self.world_size as f64,
            lr,
            tokens: reduced[1] as usize,
            grad_norm: Some(grad_norm),
            eval_loss: None,
        })
    }

    /// Optimizer steps taken so far, restored from checkpoints.
    pub fn version(&self) -> WeightVersion {
        WeightVersion(self.optimizer.step_count())
    }

    /// A CPU copy of the parameters under their names, for weight sync. One copy of the flat
    /// buffer (the cost of a save's snapshot), then views of it.
    pub fn weights(&self) -> Result<Weights, TrainError> {
        let flat = self.params();
        let copy = cpu_copy(flat.params())?;
        let tensors = flat.entries().iter().map(|e| (e.name.clone(), flat.view(&copy, e))).collect();
        Ok(Weights { version: self.version(), tensors })
    }

    /// The flat parameters: the model's variables are views of its buffer.
    pub fn params(&self) -> &FlatParams {
        self.ddp.params()
    }

    /// Ranks in the gang this engine was built with.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn device(&self) -> Device {
        self.ddp.params().params().device()
    }
}

/// A detached copy of `buf` on the CPU (what checkpoints and weight sync hand off).
pub(super) fn cpu_copy(buf: &Tensor) -> Result<Tensor, TrainError> {
    Ok(buf.f_to_device(Device::Cpu)?.f_detach_copy()?)
}
