//! The built-in training loops behind `rtrain-worker worker`, chosen by `train.trainer`.

use crate::config::TrainerKind;
use crate::lm::LmTrainer;
use crate::sft::SftTrainer;
use crate::train_loop::{LoopState, StepOutput, TrainContext, TrainError, TrainLoop};

pub enum BuiltIn {
    Lm(Box<LmTrainer>),
    Sft(Box<SftTrainer>),
}

impl BuiltIn {
    pub fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        Ok(match ctx.spec.trainer.clone() {
            TrainerKind::Lm => BuiltIn::Lm(Box::new(LmTrainer::new(ctx)?)),
            TrainerKind::Sft { model, max_len } => BuiltIn::Sft(Box::new(SftTrainer::new(ctx, &model, max_len)?)),
        })
    }

    fn inner(&mut self) -> &mut dyn TrainLoop {
        match self {
            BuiltIn::Lm(t) => t.as_mut(),
            BuiltIn::Sft(t) => t.as_mut(),
        }
    }
}

impl TrainLoop for BuiltIn {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        self.inner().step(ctx, step)
    }

    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        match self {
            BuiltIn::Lm(t) => t.state(),
            BuiltIn::Sft(t) => t.state(),
        }
    }

    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        self.inner().restore(state)
    }

    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        self.inner().finish(ctx)
    }
}
