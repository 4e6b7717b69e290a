//! [`TrainStep`], the part of a training loop that is the user's own (the model and the loss of
//! a micro-batch), and [`StepLoop`], which runs it on the [`Engine`] as a [`TrainLoop`].

use std::ops::Range;

use tch::Tensor;
use tch::nn::VarStore;

use super::data_parallel::{Engine, MicroLoss};
use crate::collective::ReduceOp;
use crate::data::rank_samples;
use crate::train_loop::{Fingerprint, LoopState, StepOutput, TrainContext, TrainError, TrainLoop};

/// A model and its loss: what a data-parallel loop supplies when the [`Engine`] does the rest.
///
/// The data of a step should depend only on the step number and the seed (see [`TrainLoop`]),
/// so a resumed run, even on another number of ranks, sees the same batches.
pub trait TrainStep {
    /// The model's variables, which the engine trains.
    fn vars(&self) -> &VarStore;

    /// The loss of the global samples `samples` (indices into the step's global batch,
    /// `0..global_batch`, the gang's workers × micro_batch × grad_accum) of step `step`: one
    /// micro-batch of this rank.
    fn loss(&mut self, ctx: &TrainContext, step: u64, samples: Range<usize>) -> Result<MicroLoss, TrainError>;

    /// How many units (samples or tokens) the loss of step `step` averages over, counted over
    /// the whole global batch; the same on every rank. By default the global batch's samples,
    /// which suits losses given as [`MicroLoss::mean`] over samples.
    fn units(&mut self, ctx: &TrainContext, step: u64) -> Result<f64, TrainError> {
        let _ = step;
        Ok(ctx.spec.global_batch as f64)
    }

    /// The model architecture a checkpoint must match, like [`TrainLoop::fingerprint`].
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint::new()
    }

    /// The held-out loss of this rank's samples `samples` of evaluation batch `batch` (of
    /// `eval.batches`, split between ranks and micro-batches as training splits a step): the
    /// loss summed over them and the units it sums over (counted as [`TrainStep::units`] counts
    /// them), or `None` when the loop has no held-out data (the default; `[eval]` then fails).
    /// The data of a batch should depend on `batch` alone, so evaluations compare.
    /// Runs without gradients after the steps `[eval]` names.
    fn eval_loss(
        &mut self,
        ctx: &TrainContext,
        batch: usize,
        samples: Range<usize>,
    ) -> Result<Option<(f64, f64)>, TrainError> {
        let _ = (ctx, batch, samples);
        Ok(None)
    }

    /// Called on every rank after the last step, like [`TrainLoop::finish`].
    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        let _ = ctx;
        Ok(())
    }
}

/// A [`TrainStep`] run by an [`Engine`]: each optimizer step goes over this rank's
/// micro-batches of the global batch (`train.grad_accum` of `train.micro_batch` samples, the
/// last ones possibly short or empty), then updates. Checkpoints hold the engine's state.
pub struct StepLoop<S> {
    train_step: S,
    engine: Engine,
}

impl<S: TrainStep> StepLoop<S> {
    /// Builds the engine for `train_step`'s variables from the job's settings.
    pub fn new(ctx: &mut TrainContext, train_step: S) -> Result<Self, TrainError> {
        let engine = Engine::for_job(train_step.vars(), ctx)?;
        Ok(Self { train_step, engine })
    }

    pub fn train_step(&self) -> &S {
        &self.train_step
    }

    pub fn train_step_mut(&mut self) -> &mut S {
        &mut self.train_step
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl<S: TrainStep> StepLoop<S> {
    /// The held-out loss over `batches` global batches: every rank's summed loss and units,
    /// added up over the gang.
    fn evaluate(&mut self, ctx: &mut TrainContext, batches: usize) -> Result<f64, TrainError> {
        let spec = &ctx.spec;
        let (micro, accum, global, world) = (spec.micro_batch, spec.grad_accum, spec.global_batch, ctx.world_size);
        let mut local = [0.0f64, 0.0];
        let _no_grad = tch::no_grad_guard();
        for batch in 0..batches {
            for m in 0..accum {
                let samples = rank_samples(m, ctx.rank, world, micro, global);
                if samples.is_empty() {
                    continue;
                }
                let Some((sum, units)) = self.engine.forward(|| self.train_step.eval_loss(ctx, batch, samples))??
                else {
                    return Err(TrainError::setting(
                        "eval.every",
                        "this training loop has no held-out loss (it does not implement TrainStep::eval_loss)",
                    ));
                };
                local[0] += sum;
                local[1] += units;
            }
        }
        let mut reduced = Tensor::from_slice(&local).f_to_device(ctx.device)?;
        ctx.collective.all_reduce(&mut reduced, ReduceOp::Sum)?;
        let reduced = Vec::<f64>::try_from(reduced.f_to_device(tch::Device::Cpu)?)?;
        if reduced[1] <= 0.0 {
            return Err(TrainError::other("the evaluation batches hold nothing to score (no trained tokens)"));
        }
        Ok(reduced[0] / reduced[1])
    }
}

impl<S: TrainStep> TrainLoop for StepLoop<S> {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        let spec = &ctx.spec;
        let (micro, accum, global, world) = (spec.micro_batch, spec.grad_accum, spec.global_batch, ctx.world_size);
        let units = self.train_step.units(ctx, step)?;
        // This rank's last non-empty micro-batch syncs the gradients during its backward.
        let last = (0..accum).rev().find(|&m| !rank_samples(m, ctx.rank, world, micro, global).is_empty());
        for m in 0..accum {
            let samples = rank_samples(m, ctx.rank, world, micro, global);
            if samples.is_empty() {
                continue;
            }
            let loss = self.engine.forward(|| self.train_step.loss(ctx, step, samples))??;
            if Some(m) == last {
                self.engine.backward_and_sync(loss, units, ctx.collective.as_mut())?;
            } else {
                self.engine.backward(loss, units)?;
            }
        }
        let mut out = self.engine.optimizer_step(ctx.collective.as_mut(), step)?;
        if let Some(eval) = ctx.spec.eval.as_ref().filter(|e| e.due(step + 1, ctx.spec.steps)) {
            out.eval_loss = Some(self.evaluate(ctx, eval.batches)?);
        }
        Ok(out)
    }

    fn fingerprint(&self) -> Fingerprint {
        self.train_step.fingerprint()
    }

    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        self.engine.state().map(Some)
    }

    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        self.engine.restore(state)
    }

    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        self.train_step.finish(ctx)
    }
}
