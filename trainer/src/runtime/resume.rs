//! Resuming from a checkpoint: the loop's model architecture is compared with the one the
//! checkpoint recorded, then the loop restores its tensors.

use std::path::Path;

use crate::snapshot::Snapshot;
use crate::train_loop::{Fingerprint, LoopState, TrainError, TrainLoop};

/// Loads the checkpoint at `path` (verified against its manifest by the launcher) into
/// `train_loop`: refused, naming each differing key, if it was written by another model
/// architecture; then `restore` checks the tensors' names and shapes. Returns the step to
/// continue from.
pub(super) fn resume<L: TrainLoop>(path: &Path, train_loop: &mut L) -> Result<u64, TrainError> {
    let snapshot = Snapshot::load(path).map_err(|source| TrainError::Checkpoint { context: "resume", source })?;
    let differences = fingerprint_differences(&train_loop.fingerprint(), &snapshot.state.model);
    if !differences.is_empty() {
        return Err(TrainError::ArchitectureMismatch { path: path.to_path_buf(), differences });
    }
    let step = snapshot.state.step;
    train_loop.restore(LoopState {
        model: snapshot.model,
        optimizer: snapshot.optimizer,
        extra: snapshot.state.extra,
    })?;
    tracing::info!(checkpoint = %path.display(), step, "resumed");
    Ok(step)
}

/// How a checkpoint's recorded architecture differs from the loop's `current` one: a sentence
/// per key of `current` that `recorded` lacks or holds another value for, sorted. Keys only
/// the checkpoint has are ignored (an older loop may have recorded more).
pub fn fingerprint_differences(current: &Fingerprint, recorded: &Fingerprint) -> Vec<String> {
    let mut differences: Vec<String> = current
        .iter()
        .filter(|(key, value)| recorded.get(*key) != Some(*value))
        .map(|(key, value)| {
            let had = recorded.get(key).map_or_else(|| "missing".to_string(), |v| v.to_string());
            format!("model.{key} is {value} in the config but {had} in the checkpoint")
        })
        .collect();
    differences.sort();
    differences
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn keys(value: serde_json::Value) -> Fingerprint {
        match value {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn names_each_differing_or_missing_key() {
        let current = keys(json!({ "n_layer": 3, "n_embd": 64, "n_head": 4, "model_type": "gpt" }));
        let recorded = keys(json!({ "n_layer": 2, "n_embd": 32, "n_head": 4, "extra": 1 }));
        assert_eq!(
            fingerprint_differences(&current, &recorded),
            [
                "model.model_type is \"gpt\" in the config but missing in the checkpoint",
                "model.n_embd is 64 in the config but 32 in the checkpoint",
                "model.n_layer is 3 in the config but 2 in the checkpoint",
            ]
        );
    }

    #[test]
    fn an_empty_fingerprint_checks_nothing() {
        let recorded = keys(json!({ "n_layer": 2 }));
        assert!(fingerprint_differences(&Fingerprint::new(), &recorded).is_empty());
        assert!(fingerprint_differences(&recorded, &recorded).is_empty());
    }
}
