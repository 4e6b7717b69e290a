//! Hugging Face weight files: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; read into named tensors and written back in the same layout.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::{Kind, Tensor};

use super::HfError;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Every tensor of a model folder by name, as stored (dtype included).
pub fn read_dir_tensors(dir: &Path) -> Result<HashMap<String, Tensor>, HfError> {
    let index_path = dir.join(INDEX_FILE);
    let files: Vec<String> = if index_path.exists() {
        let text =
            std::fs::read_to_string(&index_path).map_err(|source| HfError::Io { path: index_path.clone(), source })?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| HfError::Config { path: index_path.clone(), message: e.to_string() })?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| HfError::Config { path: index_path.clone(), message: "no `weight_map` object".into() })?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        files
    } else if dir.join(SINGLE_FILE).exists() {
        vec![SINGLE_FILE.to_string()]
    } else {
        return Err(HfError::Weights {
            path: dir.to_path_buf(),
            message: format!("holds neither {SINGLE_FILE} nor {INDEX_FILE}"),
        });
    };
    let mut tensors = HashMap::new();
    for file in files {
        let path = dir.join(&file);
        let loaded = Tensor::read_safetensors(&path)
            .map_err(|e| HfError::Weights { path: path.clone(), message: e.to_string() })?;
        tensors.extend(loaded);
    }
    Ok(tensors)
}

/// Copies `tensors` into the model's variables (converting dtype), after checking that the names
/// and shapes match exactly; every missing, unexpected or misshapen tensor is named. Names in
/// `ignore` may be present in the file without a variable (buffers some checkpoints carry).
pub fn assign(
    dir: &Path,
    vars: &BTreeMap<String, Tensor>,
    mut tensors: HashMap<String, Tensor>,
    ignore: impl Fn(&str) -> bool,
) -> Result<(), HfError> {
    let mut problems = Vec::new();
    for (name, var) in vars {
        match tensors.get(name) {
            None => problems.push(format!("missing {name}")),
            Some(t) if t.size() != var.size() => {
                problems.push(format!("{name} has shape {:?} in the file, the model needs {:?}", t.size(), var.size()))
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k) && !ignore(k)).collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|k| format!("unexpected {k}")));
    if !problems.is_empty() {
        problems.sort();
        return Err(HfError::Weights {
            path: dir.to_path_buf(),
            message: format!("does not match the model: {}", problems.join("; ")),
        });
    }
    tch::no_grad(|| {
        for (name, var) in vars {
            if let Some(src) = tensors.remove(name) {
                let mut dst = var.shallow_clone();
                dst.f_copy_(&src.to_kind(var.kind()))
                    .map_err(|e| HfError::Weights { path: dir.to_path_buf(), message: format!("{name}: {e}") })?;
            }
        }
        Ok(())
    })
}

/// Writes `tensors` as `model.safetensors`, or as shards of at most `max_shard_bytes` with an
/// index when they do not fit in one (`model-00001-of-00003.safetensors`, as transformers names
/// them), converted to `kind`.
pub fn write_dir_tensors(
    dir: &Path,
    tensors: &[(String, Tensor)],
    kind: Kind,
    max_shard_bytes: usize,
) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(|source| HfError::Io { path: dir.to_path_buf(), source })?;
    let converted: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_kind(kind).contiguous())).collect();
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0usize;
    for (name, t) in converted {
        let bytes = t.numel() * kind.elt_size_in_bytes();
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name, t));
        }
    }
    let write = |file: &str, part: &[(String, Tensor)]| {
        let path = dir.join(file);
        Tensor::write_safetensors(part, &path).map_err(|e| HfError::Weights { path, message: e.to_string() })
    };
    if shards.len() == 1 {
        let _ = std::fs::remove_file(dir.join(INDEX_FILE));
        return write(SINGLE_FILE, &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, part) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write(&file, part)?;
        for (name, t) in part {
            weight_map.insert(name.clone(), file.clone().into());
            total += t.numel() * kind.elt_size_in_bytes();
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| HfError::Config { path: path.clone(), message: e.to_string() })?;
    std::fs::write(&path, text + "\n").map_err(|source| HfError::Io { path, source })?;
    let _ = std::fs::remove_file(dir.join(SINGLE_FILE));
    Ok(())
}
