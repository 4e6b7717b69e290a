//! The built-in training loops behind `rtrain-worker worker`, chosen by `train.trainer`: each a
//! [`TrainStep`](crate::engine::TrainStep) run by the engine.

use crate::config::TrainerKind;
use crate::engine::StepLoop;
use crate::lm::LmTrainer;
use crate::sft::SftTrainer;
use crate::train_loop::{Fingerprint, LoopState, StepOutput, TrainContext, TrainError, TrainLoop};

pub enum BuiltIn {
    Lm(Box<StepLoop<LmTrainer>>),
    Sft(Box<StepLoop<SftTrainer>>),
    /// A loop of a crate built on this one (the RL trainers), through [`Extensions`].
    Extension(Box<dyn TrainLoop>),
}

/// The training loops and role programs of crates built on this one (RL post-training lives in
/// `rtrain-rl`, which depends on this crate); the `rtrain-worker` binary hands them in.
#[derive(Clone, Copy)]
pub struct Extensions {
    /// Builds the loop of the trainer kinds this crate does not know (`TrainerKind::Rl`,
    /// `TrainerKind::Preference`).
    pub trainer: fn(&mut TrainContext) -> Result<Box<dyn TrainLoop>, TrainError>,
    /// Runs the built-in role program of this name (`rtrain-worker role NAME`); `None` if unknown.
    pub role: fn(&str) -> Option<std::process::ExitCode>,
}

impl Extensions {
    /// No extensions: RL trainers and role programs are refused with a message.
    pub fn none() -> Self {
        Self {
            trainer: |_| {
                Err(TrainError::other(
                    "this rtrain-worker was built without the post-training (RL, DPO, reward model) trainers",
                ))
            },
            role: |_| None,
        }
    }
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Extensions")
    }
}

impl BuiltIn {
    pub fn new(ctx: &mut TrainContext, extensions: Extensions) -> Result<Self, TrainError> {
        Ok(match ctx.spec.trainer.clone() {
            TrainerKind::Lm => {
                let trainer = LmTrainer::new(ctx)?;
                BuiltIn::Lm(Box::new(StepLoop::new(ctx, trainer)?))
            }
            TrainerKind::Sft { model, max_len, random_init } => {
                let trainer = SftTrainer::new(ctx, &model, max_len, random_init)?;
                BuiltIn::Sft(Box::new(StepLoop::new(ctx, trainer)?))
            }
            TrainerKind::Rl { .. } | TrainerKind::Preference(_) => BuiltIn::Extension((extensions.trainer)(ctx)?),
        })
    }

    fn inner(&self) -> &dyn TrainLoop {
        match self {
            BuiltIn::Lm(t) => t.as_ref(),
            BuiltIn::Sft(t) => t.as_ref(),
            BuiltIn::Extension(t) => t.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn TrainLoop {
        match self {
            BuiltIn::Lm(t) => t.as_mut(),
            BuiltIn::Sft(t) => t.as_mut(),
            BuiltIn::Extension(t) => t.as_mut(),
        }
    }
}

impl TrainLoop for BuiltIn {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        self.inner_mut().step(ctx, step)
    }

    fn fingerprint(&self) -> Fingerprint {
        self.inner().fingerprint()
    }

    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        self.inner().state()
    }

    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        self.inner_mut().restore(state)
    }

    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        self.inner_mut().finish(ctx)
    }
}
