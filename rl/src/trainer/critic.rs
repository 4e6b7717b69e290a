//! PPO's critic: the policy's architecture, loaded from the same folder, with a scalar value head
//! on its final hidden states, trained by its own engine (DDP, AdamW) beside the policy's.

use rtrain_trainer::engine::Engine;
use rtrain_trainer::hf::HfModel;
use rtrain_trainer::{LoopState, TrainContext, TrainError};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::batch::RolloutBatch;

/// Checkpoint names of the critic's tensors start with this.
pub const CRITIC_PREFIX: &str = "critic.";

/// A value model and its optimizer.
pub struct Critic {
    model: HfModel,
    head: nn::Linear,
    pub engine: Engine,
}

impl Critic {
    /// The critic of the model folder `dir`: its weights, and a value head starting at zero (so
    /// the first values are 0 and the first advantages are the returns).
    pub fn new(ctx: &mut TrainContext, dir: &std::path::Path) -> Result<Self, TrainError> {
        let model =
            HfModel::load(dir, ctx.device).map_err(|source| TrainError::Model { context: "model.path", source })?;
        let config =
            nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
        let head = nn::linear(model.vs.root() / "value_head", model.hidden_size(), 1, config);
        let engine = Engine::for_job(&model.vs, ctx)?;
        Ok(Self { model, head, engine })
    }

    /// Values `[B, R]` of the response positions of `batch`: the value at the position that
    /// predicts response token `t`, i.e. of the state before the token is chosen.
    pub fn values(&self, batch: &RolloutBatch) -> Result<Tensor, TrainError> {
        let hidden = self
            .model
            .hidden_padded(&batch.input_ids, &batch.attention_mask)
            .map_err(|source| TrainError::Model { context: "critic", source })?;
        let values = self.head.forward(&hidden).squeeze_dim(-1).to_kind(Kind::Float);
        let r = batch.response_ids.size()[1];
        Ok(values.narrow(1, batch.prompt_len - 1, r))
    }

    /// The critic's checkpoint, its names prefixed, merged into `state`.
    pub fn add_state(&self, state: &mut LoopState) -> Result<(), TrainError> {
        let critic = self.engine.state()?;
        let prefixed = |v: Vec<(String, Tensor)>| v.into_iter().map(|(n, t)| (format!("{CRITIC_PREFIX}{n}"), t));
        state.model.extend(prefixed(critic.model));
        state.optimizer.extend(prefixed(critic.optimizer));
        if let Some(extra) = state.extra.as_object_mut() {
            extra.insert("critic".into(), critic.extra);
        }
        Ok(())
    }

    /// Takes the critic's part out of a checkpoint's `state` and restores it.
    pub fn restore_from(&mut self, state: &mut LoopState) -> Result<(), TrainError> {
        let split = |v: &mut Vec<(String, Tensor)>| {
            let (mine, rest): (Vec<_>, Vec<_>) =
                std::mem::take(v).into_iter().partition(|(n, _)| n.starts_with(CRITIC_PREFIX));
            *v = rest;
            mine.into_iter().map(|(n, t)| (n[CRITIC_PREFIX.len()..].to_string(), t)).collect::<Vec<_>>()
        };
        let critic = LoopState {
            model: split(&mut state.model),
            optimizer: split(&mut state.optimizer),
            extra: state.extra.as_object_mut().and_then(|e| e.remove("critic")).unwrap_or_default(),
        };
        self.engine.restore(critic)
    }
}
