//! The engine's checkpoint state: parameters under their variable names, AdamW's moments as
//! `exp_avg.<name>` and `exp_avg_sq.<name>`, and the optimizer step count.

use std::collections::{HashMap, HashSet};

use tch::{Kind, Tensor};

use super::data_parallel::{Engine, cpu_copy};
use crate::optim::FlatEntry;
use crate::train_loop::{LoopState, TrainError};

/// Where the state keeps AdamW's step count (the bias correction of the next step needs it).
const OPTIMIZER_STEP: &str = "optimizer_step";

impl Engine {
    /// The state to checkpoint: one CPU copy of each flat buffer, then views of the copies (the
    /// step loop's stall per save).
    pub fn state(&self) -> Result<LoopState, TrainError> {
        let flat = self.ddp.params();
        let (params, exp_avg, exp_avg_sq) =
            (cpu_copy(flat.params())?, cpu_copy(self.optimizer.exp_avg())?, cpu_copy(self.optimizer.exp_avg_sq())?);
        let mut state = LoopState {
            extra: serde_json::json!({ OPTIMIZER_STEP: self.optimizer.step_count() }),
            ..Default::default()
        };
        for entry in flat.entries() {
            state.model.push((entry.name.clone(), flat.view(&params, entry)));
            state.optimizer.push((format!("exp_avg.{}", entry.name), flat.view(&exp_avg, entry)));
            state.optimizer.push((format!("exp_avg_sq.{}", entry.name), flat.view(&exp_avg_sq, entry)));
        }
        Ok(state)
    }

    /// Restores a state from [`Engine::state`], refusing one whose tensors are not exactly the
    /// model's (naming each missing, unexpected or misshapen tensor).
    pub fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        let flat = self.ddp.params();
        let model: HashMap<String, Tensor> = state.model.into_iter().collect();
        let optimizer: HashMap<String, Tensor> = state.optimizer.into_iter().collect();
        check_names("model.safetensors", flat.entries(), &model, "")?;
        check_names("optimizer.safetensors", flat.entries(), &optimizer, "exp_avg.")?;
        check_names("optimizer.safetensors", flat.entries(), &optimizer, "exp_avg_sq.")?;
        let optimizer_step =
            state.extra.get(OPTIMIZER_STEP).and_then(|v| v.as_u64()).ok_or_else(|| TrainError::StateMismatch {
                file: "trainer_state.json",
                problems: vec![format!("extra.{OPTIMIZER_STEP} is missing (not a checkpoint of the training engine)")],
            })?;
        let device = flat.params().device();
        // Every name was checked above: indexing cannot miss.
        let flatten = |map: &HashMap<String, Tensor>, prefix: &str| -> Result<Tensor, TrainError> {
            let parts: Vec<Tensor> =
                flat.entries().iter().map(|e| map[&format!("{prefix}{}", e.name)].reshape([-1])).collect();
            Ok(Tensor::f_cat(&parts, 0)?.f_to_kind(Kind::Float)?.f_to_device(device)?)
        };
        let (params, exp_avg, exp_avg_sq) =
            (flatten(&model, "")?, flatten(&optimizer, "exp_avg.")?, flatten(&optimizer, "exp_avg_sq.")?);
        let mut target = flat.params().shallow_clone();
        tch::no_grad(|| target.f_copy_(&params))?;
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
    if prefix.is_empty() {
        let known: HashSet<String> = entries.iter().map(|e| e.name.clone()).collect();
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
