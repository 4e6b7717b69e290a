//! Small JSON records in the run directory (held-out scores before and after training), which
//! the launcher folds into `summary.json`.

use std::path::Path;

use rtrain_trainer::TrainError;

/// Sets `entries` in the JSON object of file `path` (created when missing), keeping its other
/// keys; the file is replaced atomically.
pub(crate) fn record(path: &Path, entries: Vec<(&str, serde_json::Value)>) -> Result<(), TrainError> {
    let mut doc: serde_json::Map<String, serde_json::Value> =
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    for (key, value) in entries {
        doc.insert(key.into(), value);
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(&doc).map_err(|e| TrainError::other(e.to_string()))?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| TrainError::Io { path: path.to_path_buf(), source })
}
