//! Writing, listing, verifying and reading checkpoint directories.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{
    CHECKPOINTS_DIR, CheckpointError, LATEST_FILE, MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, Manifest, ManifestFile,
    MetricOrder, STATE_FILE, TensorFiles, TrainerState, hex, io_err, to_delete,
};

/// A published checkpoint directory (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub step: u64,
    pub path: PathBuf,
}

/// `step-000200`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn parse_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The published checkpoints of a run, oldest first. Temporary directories of unfinished writes
/// are not checkpoints and are left out.
pub fn list(run: &Path) -> Result<Vec<Checkpoint>, CheckpointError> {
    let dir = run.join(CHECKPOINTS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(parse_dir_name) {
            found.push(Checkpoint { step, path: entry.path() });
        }
    }
    found.sort_by_key(|c| c.step);
    Ok(found)
}

/// A checkpoint that matches its manifest: the manifest and the trainer state.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub state: TrainerState,
}

/// Checks a checkpoint against its manifest: every listed file present with its size and
/// SHA-256, and the trainer state readable.
pub fn verify(path: &Path) -> Result<Verified, CheckpointError> {
    let manifest_path = path.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(io_err(&manifest_path))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::invalid(&manifest_path, format!("unreadable manifest: {e}")))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(CheckpointError::invalid(&manifest_path, format!("unknown format {}", manifest.format)));
    }
    for required in [MODEL_FILE, STATE_FILE] {
        if !manifest.files.iter().any(|f| f.name == required) {
            return Err(CheckpointError::invalid(&manifest_path, format!("does not list {required}")));
        }
    }
    for file in &manifest.files {
        let file_path = path.join(&file.name);
        let (bytes, sha256) = hash_file(&file_path)?;
        if bytes != file.bytes {
            return Err(CheckpointError::invalid(
                &file_path,
                format!("{bytes} bytes, the manifest says {} (truncated or replaced)", file.bytes),
            ));
        }
        if sha256 != file.sha256 {
            return Err(CheckpointError::invalid(&file_path, "SHA-256 differs from the manifest (corrupted)"));
        }
    }
    let state = read_state(path)?;
    Ok(Verified { manifest, state })
}

/// The outcome of looking for a checkpoint to resume from.
#[derive(Debug, Default)]
pub struct Scan {
    /// The newest checkpoint that verifies.
    pub newest: Option<(Checkpoint, Verified)>,
    /// Newer checkpoints that failed verification, with the reason, newest first.
    pub skipped: Vec<(Checkpoint, CheckpointError)>,
}

/// The newest checkpoint of `run` that verifies, and the newer ones that did not.
pub fn newest_valid(run: &Path) -> Result<Scan, CheckpointError> {
    let mut scan = Scan::default();
    for ckpt in list(run)?.into_iter().rev() {
        match verify(&ckpt.path) {
            Ok(verified) => {
                scan.newest = Some((ckpt, verified));
                break;
            }
            Err(e) => scan.skipped.push((ckpt, e)),
        }
    }
    Ok(scan)
}

/// Writes a checkpoint of `state.step` as `checkpoints/step-NNNNNN` of `run`: the tensor files and
/// the state into a temporary directory, synced, the manifest last, then one rename publishes it
/// and `latest` is pointed at it.
pub fn write(
    run: &Path,
    tensors: &dyn TensorFiles,
    state: &TrainerState,
    config_text: &str,
) -> Result<PathBuf, CheckpointError> {
    let root = run.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).map_err(io_err(&root))?;
    let step = state.step;
    let name = dir_name(step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let result = write_files(&tmp, tensors, state, config_text).and_then(|()| publish(&root, &tmp, &name));
    if result.is_err() {
        // Best effort: the half-written directory is never read (it has a temporary name).
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| root.join(&name))
}

fn write_files(
    tmp: &Path,
    tensors: &dyn TensorFiles,
    state: &TrainerState,
    config_text: &str,
) -> Result<(), CheckpointError> {
    let mut files = tensors.write_into(tmp)?;
    let state_path = tmp.join(STATE_FILE);
    let state_text =
        serde_json::to_string_pretty(state).map_err(|e| CheckpointError::invalid(&state_path, e.to_string()))?;
    std::fs::write(&state_path, state_text + "\n").map_err(io_err(&state_path))?;
    files.push(STATE_FILE);

    let mut listed = Vec::new();
    for file in files {
        let path = tmp.join(file);
        sync_file(&path)?;
        let (bytes, sha256) = hash_file(&path)?;
        listed.push(ManifestFile { name: file.to_string(), bytes, sha256 });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        step: state.step,
        created_unix: crate::contract::unix_now(),
        files: listed,
        config_digest: state.config_digest.clone(),
        config: config_text.to_string(),
    };
    let manifest_path = tmp.join(MANIFEST_FILE);
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| CheckpointError::invalid(&manifest_path, e.to_string()))?;
    std::fs::write(&manifest_path, text + "\n").map_err(io_err(&manifest_path))?;
    sync_file(&manifest_path)?;
    sync_dir(tmp)
}

/// Renames `tmp` to `root/name` (replacing an earlier checkpoint of the same step, which a
/// resumed run writes again), then points `latest` at it.
fn publish(root: &Path, tmp: &Path, name: &str) -> Result<(), CheckpointError> {
    let target = root.join(name);
    if target.exists() {
        let old = root.join(format!(".tmp-replaced-{name}-{}", std::process::id()));
        std::fs::rename(&target, &old).map_err(io_err(&target))?;
        std::fs::rename(tmp, &target).map_err(io_err(&target))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, &target).map_err(io_err(&target))?;
    }
    sync_dir(root)?;
    let latest = root.join(LATEST_FILE);
    let latest_tmp = root.join(format!(".{LATEST_FILE}.tmp-{}", std::process::id()));
    std::fs::write(&latest_tmp, format!("{name}\n")).map_err(io_err(&latest_tmp))?;
    sync_file(&latest_tmp)?;
    std::fs::rename(&latest_tmp, &latest).map_err(io_err(&latest))?;
    sync_dir(root)
}

/// Applies the retention policy to the published checkpoints of `run`; returns the deleted steps.
/// A checkpoint whose state cannot be read has no metric but is otherwise kept or deleted by age.
pub fn retain(run: &Path, keep_last: usize, keep_best: usize, order: MetricOrder) -> Result<Vec<u64>, CheckpointError> {
    let all = list(run)?;
    let with_metric: Vec<(u64, Option<f64>)> =
        all.iter().map(|c| (c.step, read_state(&c.path).ok().and_then(|s| s.metric))).collect();
    let delete = to_delete(&with_metric, keep_last, keep_best, order);
    for ckpt in all.iter().filter(|c| delete.contains(&c.step)) {
        std::fs::remove_dir_all(&ckpt.path).map_err(io_err(&ckpt.path))?;
    }
    Ok(delete)
}

/// The trainer state of a checkpoint directory.
pub fn read_state(path: &Path) -> Result<TrainerState, CheckpointError> {
    let state_path = path.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    serde_json::from_str(&text)
        .map_err(|e| CheckpointError::invalid(&state_path, format!("unreadable trainer state: {e}")))
}

fn hash_file(path: &Path) -> Result<(u64, String), CheckpointError> {
    use sha2::Digest;
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    let file = File::options().append(true).open(path).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io_err(path))
}
