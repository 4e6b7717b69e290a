//! The job's working directory, shipped to the other hosts (like Ray's `runtime_env`
//! `working_dir`): at each launch the driver packs it into one archive named by the SHA-256 of
//! its bytes, leaving out what `.gitignore`, `.ignore` and `.rtrainignore` files exclude, `.git`
//! and the run directory; an agent fetches an archive it has not seen, unpacks it once into its
//! cache, and runs the job's processes there. A file edited on the driver's host is on every host
//! at the next launch.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Files the ignore rules of `.rtrainignore` leave out, besides `.gitignore` and `.ignore`.
pub const IGNORE_FILE: &str = ".rtrainignore";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot pack job.working_dir {}: {message}", dir.display())]
    Read { dir: PathBuf, message: String },
    #[error(
        "job.working_dir {} holds {size_mb:.1} MB to ship to the other hosts, more than \
         cluster.max_working_dir_mb = {limit_mb}; leave large files out with a .gitignore or {IGNORE_FILE} \
         (its biggest: {biggest}), or raise the limit",
        dir.display()
    )]
    TooLarge { dir: PathBuf, size_mb: f64, limit_mb: u64, biggest: String },
    #[error("the working directory's archive {digest} is damaged: {message}")]
    Damaged { digest: String, message: String },
    #[error("cannot unpack the working directory into {}: {source}", path.display())]
    Unpack { path: PathBuf, source: std::io::Error },
}

/// The packed working directory.
#[derive(Clone)]
pub struct Bundle {
    /// Hex SHA-256 of `bytes`.
    pub digest: String,
    pub bytes: Arc<Vec<u8>>,
    pub files: usize,
    /// The directory it was packed from, on the driver's host.
    pub root: PathBuf,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle").field("digest", &self.digest).field("files", &self.files).finish()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Packs `dir` without the paths `skip` (the run directory, the token and key files, when they
/// are inside), refusing more than `limit_mb` megabytes of files. The archive is the same for the
/// same files: sorted, with no times or owners.
pub fn pack(dir: &Path, skip: &[&Path], limit_mb: u64) -> Result<Bundle, BundleError> {
    let read_err = |message: String| BundleError::Read { dir: dir.to_path_buf(), message };
    let mut entries: Vec<(PathBuf, PathBuf, std::fs::Metadata)> = Vec::new();
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(true)
        .require_git(false)
        .ignore(true)
        .parents(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    for entry in walk {
        let entry = entry.map_err(|e| read_err(e.to_string()))?;
        let path = entry.path();
        if path == dir || skip.iter().any(|s| path.starts_with(s)) {
            continue;
        }
        let meta = std::fs::symlink_metadata(path).map_err(|e| read_err(format!("{}: {e}", path.display())))?;
        let rel = path.strip_prefix(dir).map_err(|e| read_err(e.to_string()))?.to_path_buf();
        entries.push((rel, path.to_path_buf(), meta));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let total: u64 = entries.iter().filter(|e| e.2.is_file()).map(|e| e.2.len()).sum();
    if total > limit_mb.saturating_mul(1_000_000) {
        let biggest = entries
            .iter()
            .filter(|e| e.2.is_file())
            .max_by_key(|e| e.2.len())
            .map_or(String::new(), |e| format!("{}, {:.1} MB", e.0.display(), e.2.len() as f64 / 1e6));
        return Err(BundleError::TooLarge { dir: dir.into(), size_mb: total as f64 / 1e6, limit_mb, biggest });
    }
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut files = 0;
    for (rel, path, meta) in &entries {
        let added = if meta.is_dir() {
            tar.append_dir(rel, path)
        } else if meta.is_file() || meta.file_type().is_symlink() {
            files += 1;
            tar.append_path_with_name(path, rel)
        } else {
            // Sockets, fifos and devices are not code.
            continue;
        };
        added.map_err(|e| read_err(format!("{}: {e}", path.display())))?;
    }
    let bytes = tar.into_inner().map_err(|e| read_err(e.to_string()))?;
    Ok(Bundle { digest: sha256_hex(&bytes), bytes: Arc::new(bytes), files, root: dir.to_path_buf() })
}

/// Where an agent keeps the working directories it has unpacked (`<cache>/working_dirs/<digest>`).
pub fn cached(cache: &Path, digest: &str) -> PathBuf {
    cache.join("working_dirs").join(digest)
}

/// Unpacks `bytes` (checked against `digest`) into the cache, once: a finished copy is never
/// changed, a half-written one is never seen (it is unpacked beside and renamed into place).
pub fn unpack(cache: &Path, digest: &str, bytes: &[u8]) -> Result<PathBuf, BundleError> {
    let target = cached(cache, digest);
    if target.is_dir() {
        return Ok(target);
    }
    let actual = sha256_hex(bytes);
    if actual != digest {
        return Err(BundleError::Damaged { digest: digest.into(), message: format!("its bytes hash to {actual}") });
    }
    let parent = target.parent().unwrap_or(cache);
    std::fs::create_dir_all(parent).map_err(|source| BundleError::Unpack { path: parent.into(), source })?;
    let staging = tempfile::Builder::new()
        .prefix(".unpacking-")
        .tempdir_in(parent)
        .map_err(|source| BundleError::Unpack { path: parent.into(), source })?;
    let mut archive = tar::Archive::new(bytes);
    archive.set_preserve_permissions(true);
    // `unpack` refuses entries that would land outside the directory (`..`, absolute paths).
    archive
        .unpack(staging.path())
        .map_err(|source| BundleError::Unpack { path: staging.path().to_path_buf(), source })?;
    let staged = staging.keep();
    match std::fs::rename(&staged, &target) {
        Ok(()) => Ok(target),
        // Another agent on this host unpacked the same archive first.
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(&staged);
            Ok(target)
        }
        Err(source) => Err(BundleError::Unpack { path: target, source }),
    }
}

/// Reads a whole stream of archive chunks (as the agent receives them) into memory, up to `limit`
/// bytes.
pub fn read_limited(mut reader: impl Read, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.by_ref().take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!("more than {limit} bytes")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        std::fs::create_dir_all(dir.join("runs/x")).unwrap();
        std::fs::write(dir.join("train.py"), "print('v1')\n").unwrap();
        std::fs::write(dir.join("src/lib.py"), "x = 1\n").unwrap();
        std::fs::write(dir.join(".gitignore"), "*.bin\n").unwrap();
        std::fs::write(dir.join(IGNORE_FILE), "secret.txt\n").unwrap();
        std::fs::write(dir.join("weights.bin"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("secret.txt"), "no").unwrap();
        std::fs::write(dir.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(dir.join("runs/x/metrics.jsonl"), "{}").unwrap();
        std::fs::write(dir.join("job.token"), "0123456789abcdef").unwrap();
    }

    #[test]
    fn packing_leaves_out_ignored_files_git_and_the_run_directory_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path());
        let a = pack(dir.path(), &[&dir.path().join("runs"), &dir.path().join("job.token")], 10).unwrap();
        let b = pack(dir.path(), &[&dir.path().join("runs"), &dir.path().join("job.token")], 10).unwrap();
        assert_eq!(a.digest, b.digest);
        let cache = tempfile::tempdir().unwrap();
        let copy = unpack(cache.path(), &a.digest, &a.bytes).unwrap();
        assert_eq!(std::fs::read_to_string(copy.join("train.py")).unwrap(), "print('v1')\n");
        assert!(copy.join("src/lib.py").is_file());
        for gone in ["weights.bin", "secret.txt", ".git", "runs", "job.token"] {
            assert!(!copy.join(gone).exists(), "{gone} was shipped");
        }
        // An edit makes another archive; the first copy stays as it was.
        std::fs::write(dir.path().join("train.py"), "print('v2')\n").unwrap();
        let c = pack(dir.path(), &[&dir.path().join("runs"), &dir.path().join("job.token")], 10).unwrap();
        assert_ne!(c.digest, a.digest);
        let copy2 = unpack(cache.path(), &c.digest, &c.bytes).unwrap();
        assert_eq!(std::fs::read_to_string(copy2.join("train.py")).unwrap(), "print('v2')\n");
        assert_eq!(std::fs::read_to_string(copy.join("train.py")).unwrap(), "print('v1')\n");
    }

    #[test]
    fn too_much_is_refused_naming_the_biggest_file_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.npy"), vec![1u8; 1_500_000]).unwrap();
        let e =
            pack(dir.path(), &[&dir.path().join("runs"), &dir.path().join("job.token")], 1).unwrap_err().to_string();
        assert!(e.contains("cluster.max_working_dir_mb = 1") && e.contains("data.npy, 1.5 MB"), "{e}");
        let ok = pack(dir.path(), &[&dir.path().join("runs"), &dir.path().join("job.token")], 2).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mut bad = ok.bytes.to_vec();
        bad[600] ^= 1;
        assert!(matches!(unpack(cache.path(), &ok.digest, &bad), Err(BundleError::Damaged { .. })));
        assert!(!cached(cache.path(), &ok.digest).exists());
    }
}
