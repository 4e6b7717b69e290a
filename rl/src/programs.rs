//! The post-training loops (RL, DPO, reward model) and the rollout actor as programs of
//! `rtrain-worker`.

use std::process::ExitCode;

use rtrain_core::config::TrainerKind;
use rtrain_core::config::rl::ROLLOUT_ROLE;
use rtrain_trainer::builtin::Extensions;
use rtrain_trainer::{TrainContext, TrainError, TrainLoop};

use crate::preference::PreferenceLoop;
use crate::trainer::RlLoop;

/// What `rtrain-worker` gains from this crate: the RL and preference training loops and the
/// `rollout` program.
pub fn extensions() -> Extensions {
    Extensions { trainer: rl_trainer, role }
}

fn rl_trainer(ctx: &mut TrainContext) -> Result<Box<dyn TrainLoop>, TrainError> {
    Ok(match ctx.spec.trainer {
        TrainerKind::Preference(_) => Box::new(PreferenceLoop::new(ctx)?),
        _ => Box::new(RlLoop::new(ctx)?),
    })
}

fn role(name: &str) -> Option<ExitCode> {
    (name == ROLLOUT_ROLE).then(crate::rollout::actor::main)
}
