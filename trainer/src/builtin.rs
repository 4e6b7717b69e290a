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
}

impl BuiltIn {
    pub fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        Ok(match ctx.spec.trainer.clone() {
            TrainerKind::Lm => {
                let trainer = LmTrainer::new(ctx)?;
                BuiltIn::Lm(Box::new(StepLoop::new(ctx, trainer)?))
            }
            TrainerKind::Sft { model, max_len } => {
                let trainer = SftTrainer::new(ctx, &model, max_len)?;
                BuiltIn::Sft(Box::new(StepLoop::new(ctx, trainer)?))
            }
        })
    }

    fn inner(&self) -> &dyn TrainLoop {
        match self {
            BuiltIn::Lm(t) => t.as_ref(),
            BuiltIn::Sft(t) => t.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn TrainLoop {
        match self {
            BuiltIn::Lm(t) => t.as_mut(),
            BuiltIn::Sft(t) => t.as_mut(),
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
