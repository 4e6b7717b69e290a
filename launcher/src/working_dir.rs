//! The job's working directory, shipped to the other hosts (like Ray's `runtime_env`
//! `working_dir`): at each launch the driver packs it into one archive named by the SHA-256 of
//! its bytes, leaving out what `.gitignore`, `.ignore` and `.rtrainignore` files exclude, `.git`,
//! the run directory and the job's secrets; file modes are kept. An agent fetches an archive it
//! has not seen and keeps it in its cache (checked against its name at every use); each agent
//! session unpacks it into a copy of its own, where the job's processes run, and removes the copy
//! when it ends. A file edited on the driver's host is on every host at the next launch, and
//! what a job writes into its copy never reaches a later one.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
    // Compared by where they lead, so a link to a secret does not ship the secret.
    let skip: Vec<PathBuf> =
        skip.iter().flat_map(|s| [s.to_path_buf(), s.canonicalize().unwrap_or_else(|_| s.to_path_buf())]).collect();
    let skipped = |path: &Path| {
        let real = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        skip.iter().any(|s| path.starts_with(s) || real.starts_with(s))
    };
    let mut entries: Vec<(PathBuf, PathBuf, std::fs::Metadata)> = Vec::new();
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(true)
        .require_git(false)
        .ignore(true)
        // A repository's .gitignore above the folder counts too, as git reads it.
        .parents(true)
        .add_custom_ignore_filename(IGNORE_FILE)
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    for entry in walk {
        let entry = entry.map_err(|e| read_err(e.to_string()))?;
        let path = entry.path();
        if path == dir || skipped(path) {
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
    let mut files = 0;
    for (rel, path, meta) in &entries {
        let kind = meta.file_type();
        if !(kind.is_dir() || kind.is_file() || kind.is_symlink()) {
            // Sockets, fifos and devices are not code.
            continue;
        }
        // No times or owners (the same files give the same archive); the mode as it is.
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Deterministic);
        header.set_mode(meta.permissions().mode() & 0o7777);
        let added = if kind.is_dir() {
            tar.append_data(&mut header, rel, std::io::empty())
        } else if kind.is_symlink() {
            files += 1;
            std::fs::read_link(path).and_then(|target| tar.append_link(&mut header, rel, target))
        } else {
            files += 1;
            std::fs::File::open(path).and_then(|file| tar.append_data(&mut header, rel, file))
        };
        added.map_err(|e| read_err(format!("{}: {e}", path.display())))?;
    }
    let bytes = tar.into_inner().map_err(|e| read_err(e.to_string()))?;
    Ok(Bundle { digest: sha256_hex(&bytes), bytes: Arc::new(bytes), files, root: dir.to_path_buf() })
}

/// A directory only its owner may enter (the cache holds the job's files).
fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Archives kept in an agent's cache: the newest this many.
const KEEP_ARCHIVES: usize = 8;

fn archive_path(cache: &Path, digest: &str) -> PathBuf {
    cache.join("archives").join(format!("{digest}.tar"))
}

/// The archive `digest` from the cache, if it is there and its bytes still hash to its name (a
/// damaged one is removed, to be fetched again).
pub fn cached_archive(cache: &Path, digest: &str) -> Option<Vec<u8>> {
    let path = archive_path(cache, digest);
    let bytes = std::fs::read(&path).ok()?;
    if sha256_hex(&bytes) == digest {
        return Some(bytes);
    }
    let _ = std::fs::remove_file(&path);
    None
}

/// Checks fetched `bytes` against `digest` and keeps them in the cache (owner-only), dropping the
/// oldest archives beyond the newest [`KEEP_ARCHIVES`].
pub fn store_archive(cache: &Path, digest: &str, bytes: &[u8]) -> Result<(), BundleError> {
    let actual = sha256_hex(bytes);
    if actual != digest {
        return Err(BundleError::Damaged { digest: digest.into(), message: format!("its bytes hash to {actual}") });
    }
    let dir = cache.join("archives");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Unpack { path, source }
    };
    private_dir(cache).and_then(|()| private_dir(&dir)).map_err(io(&dir))?;
    let path = archive_path(cache, digest);
    let tmp = dir.join(format!(".{digest}.{}.tmp", std::process::id()));
    let written = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&path)(e));
    }
    let mut archives: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".tar"))
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    archives.sort();
    for (_, old) in archives.iter().rev().skip(KEEP_ARCHIVES) {
        let _ = std::fs::remove_file(old);
    }
    Ok(())
}

/// Unpacks `bytes` into `target` (made for it, owner-only). The archive's own checks refuse
/// entries that would land outside it (`..`, absolute paths).
pub fn unpack_into(bytes: &[u8], target: &Path) -> Result<(), BundleError> {
    let err = |source| BundleError::Unpack { path: target.to_path_buf(), source };
    if let Some(parent) = target.parent() {
        private_dir(parent).map_err(err)?;
    }
    std::fs::create_dir(target).map_err(err)?;
    let mut archive = tar::Archive::new(bytes);
    archive.set_preserve_permissions(true);
    archive.unpack(target).map_err(err)
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

    fn copy_of(bundle: &Bundle, cache: &Path, name: &str) -> PathBuf {
        store_archive(cache, &bundle.digest, &bundle.bytes).unwrap();
        let bytes = cached_archive(cache, &bundle.digest).unwrap();
        let target = cache.join("sessions").join(name);
        unpack_into(&bytes, &target).unwrap();
        target
    }

    #[test]
    fn packing_leaves_out_ignored_files_git_runs_and_secrets_keeps_modes_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        tree(d);
        // A private file keeps its mode; a link to the token does not ship the token.
        std::fs::write(d.join("key.pem"), "k").unwrap();
        std::fs::set_permissions(d.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(d.join("real")).unwrap();
        std::fs::write(d.join("real/token"), "0123456789abcdef").unwrap();
        std::os::unix::fs::symlink("real/token", d.join("link.token")).unwrap();
        let skip = [d.join("runs"), d.join("job.token"), d.join("link.token")];
        let skip: Vec<&Path> = skip.iter().map(PathBuf::as_path).collect();
        let a = pack(d, &skip, 10).unwrap();
        assert_eq!(a.digest, pack(d, &skip, 10).unwrap().digest);
        let cache = tempfile::tempdir().unwrap();
        let copy = copy_of(&a, cache.path(), "one");
        assert_eq!(std::fs::read_to_string(copy.join("train.py")).unwrap(), "print('v1')\n");
        assert!(copy.join("src/lib.py").is_file());
        for gone in ["weights.bin", "secret.txt", ".git", "runs", "job.token", "link.token", "real/token"] {
            assert!(!copy.join(gone).exists(), "{gone} was shipped");
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&copy.join("key.pem")), 0o600);
        assert_eq!(mode(&cache.path().join("archives")), 0o700);
        // An edit makes another archive; each session's copy is its own.
        std::fs::write(d.join("train.py"), "print('v2')\n").unwrap();
        let c = pack(d, &skip, 10).unwrap();
        assert_ne!(c.digest, a.digest);
        let copy2 = copy_of(&c, cache.path(), "two");
        assert_eq!(std::fs::read_to_string(copy2.join("train.py")).unwrap(), "print('v2')\n");
        assert_eq!(std::fs::read_to_string(copy.join("train.py")).unwrap(), "print('v1')\n");
    }

    #[test]
    fn too_much_is_refused_naming_the_biggest_file_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.npy"), vec![1u8; 1_500_000]).unwrap();
        let e = pack(dir.path(), &[], 1).unwrap_err().to_string();
        assert!(e.contains("cluster.max_working_dir_mb = 1") && e.contains("data.npy, 1.5 MB"), "{e}");
        let ok = pack(dir.path(), &[], 2).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mut bad = ok.bytes.to_vec();
        bad[600] ^= 1;
        assert!(matches!(store_archive(cache.path(), &ok.digest, &bad), Err(BundleError::Damaged { .. })));
        assert!(cached_archive(cache.path(), &ok.digest).is_none());
        // A kept archive changed on disk is dropped, to be fetched again.
        store_archive(cache.path(), &ok.digest, &ok.bytes).unwrap();
        std::fs::write(archive_path(cache.path(), &ok.digest), &bad).unwrap();
        assert!(cached_archive(cache.path(), &ok.digest).is_none());
        assert!(!archive_path(cache.path(), &ok.digest).exists());
    }
}
