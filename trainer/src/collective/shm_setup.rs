//! Setting up the `shm` backend's memory: checking that the ranks share a host, creating,
//! exchanging, mapping and unlinking the `/dev/shm` files. Every step that can fail on one rank
//! ends in an agreement over the TCP ring, so all ranks fail (or succeed) alike. A file is
//! unlinked by its creator on every path out of these functions, errors included ([`ShmFile`]).

use std::fs::{File, OpenOptions};
use std::mem::ManuallyDrop;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapRaw;

use super::{Collective, CollectiveError, TcpCollective};

const SHM_DIR: &str = "/dev/shm";
const NAME_LEN: usize = 96;

pub(super) fn unavailable(reason: String) -> CollectiveError {
    CollectiveError::Unavailable { backend: "shm", reason }
}

/// Fails on every rank unless all of them run on this host (same boot id and host name).
pub(super) fn check_one_host(tcp: &mut TcpCollective) -> Result<(), CollectiveError> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut id = [0u8; 64];
    let text = format!("{}@{}", boot.trim(), host.trim());
    let n = text.len().min(id.len());
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    let mut all = vec![0u8; 64 * tcp.world_size()];
    tcp.all_gather_bytes(&id, &mut all)?;
    if all.chunks(64).all(|peer| peer == id) {
        Ok(())
    } else {
        Err(unavailable("the ranks are not all on one host; use backend \"tcp\"".into()))
    }
}

/// A file this rank created under /dev/shm; unlinked when dropped. The mappings made of it stay
/// valid: an unlinked file lives on until its last mapping goes.
#[derive(Debug)]
struct ShmFile {
    path: PathBuf,
    file: File,
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        // Best effort: nothing is left to do if it is already gone.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A new zero-filled file under /dev/shm of `len` bytes, with its pages reserved up front (so a
/// full /dev/shm fails here, not with SIGBUS at first touch).
fn create_shm_file(tag: &str, len: usize) -> Result<ShmFile, String> {
    // Unique within the process too: ranks run as threads of one process in benchmarks and tests,
    // and two of them may ask in the same clock tick.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = PathBuf::from(SHM_DIR).join(format!("rtrain-{}-{nanos}-{seq}-{tag}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let created = ShmFile { path, file };
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a file this function owns.
    let rc = unsafe { libc::posix_fallocate(created.file.as_raw_fd(), 0, len as libc::off_t) };
    if rc != 0 {
        return Err(format!(
            "cannot reserve {len} bytes in {SHM_DIR}: {} ({SHM_DIR} may be too small: \
             `df -h {SHM_DIR}`; in Docker, raise --shm-size)",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    Ok(created)
}

fn map(file: &File, len: usize, path: &Path) -> Result<MmapRaw, String> {
    let actual = file.metadata().map(|m| m.len()).unwrap_or(0);
    if actual != len as u64 {
        return Err(format!("{} holds {actual} bytes, expected {len}", path.display()));
    }
    // The file is private to the gang (mode 0600, unique name); its memory is only reached
    // through raw pointers and atomics (see `shm_segment`).
    MmapRaw::map_raw(file).map_err(|e| format!("cannot map {}: {e}", path.display()))
}

/// Maps a file another rank created.
fn open_and_map(path: &Path, len: usize) -> Result<MmapRaw, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    map(&file, len, path)
}

fn encode_name(path: &Path) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let text = path.to_string_lossy();
    let n = text.len().min(NAME_LEN);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

/// A peer's file name, if it is one this module would create (a file of its own under
/// /dev/shm): a peer's bytes never make this rank open anything else.
fn decode_name(bytes: &[u8]) -> Option<PathBuf> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let path = PathBuf::from(std::str::from_utf8(&bytes[..end]).ok()?);
    let ours = path.parent() == Some(Path::new(SHM_DIR))
        && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("rtrain-"));
    ours.then_some(path)
}

/// Rank 0 creates the gang file and broadcasts its name; the others map it; once all have, rank
/// 0 unlinks it (and on every early return). Any rank's failure fails every rank.
pub(super) fn map_gang_file(tcp: &mut TcpCollective, len: usize) -> Result<MmapRaw, CollectiveError> {
    let rank = tcp.rank();
    let mut name = [0u8; NAME_LEN];
    let mut created = None;
    let mut failure = None;
    if rank == 0 {
        match create_shm_file("gang", len) {
            Ok(file) => {
                name = encode_name(&file.path);
                created = Some(file);
            }
            Err(e) => failure = Some(e),
        }
    }
    tcp.broadcast_bytes(&mut name, 0)?;
    let mapped = match (&created, decode_name(&name)) {
        (Some(file), _) => map(&file.file, len, &file.path),
        (None, Some(path)) => open_and_map(&path, len),
        (None, None) => Err(failure.take().unwrap_or_else(|| "rank 0 could not create the gang's segment".into())),
    };
    let all_ok = agree(tcp, mapped.is_ok())?;
    drop(created);
    match (mapped, all_ok) {
        (Ok(m), true) => Ok(m),
        (Err(e), _) => Err(unavailable(e)),
        (Ok(_), false) => Err(unavailable("another rank could not map the gang's shared memory (see its log)".into())),
    }
}

/// A buffer every rank mapped, as the mappings of each rank's copy, indexed by rank. They are
/// never unmapped: tensors made over them may be kept anywhere in the process.
pub(super) type PeerBuffers = Vec<ManuallyDrop<MmapRaw>>;

/// Each rank creates and maps its own buffer file, the names go round, every rank maps every
/// peer's; then each unlinks its own (also when a peer drops out on the way). `None` on every
/// rank if any rank failed (logged).
pub(super) fn map_peer_buffers(tcp: &mut TcpCollective, bytes: usize) -> Result<Option<PeerBuffers>, CollectiveError> {
    let (rank, world) = (tcp.rank(), tcp.world_size());
    let own = create_shm_file("buf", bytes).and_then(|file| Ok((map(&file.file, bytes, &file.path)?, file)));
    let name = own.as_ref().map_or([0u8; NAME_LEN], |(_, file)| encode_name(&file.path));
    let mut names = vec![0u8; NAME_LEN * world];
    tcp.all_gather_bytes(&name, &mut names)?;
    let mut maps = Vec::with_capacity(world);
    let mut failure = own.as_ref().err().cloned();
    for (k, peer) in names.chunks(NAME_LEN).enumerate().filter(|(k, _)| *k != rank) {
        if failure.is_some() {
            break;
        }
        let mapped = match decode_name(peer) {
            None => Err(format!("rank {k} could not create its shared buffer")),
            Some(path) => open_and_map(&path, bytes),
        };
        match mapped {
            Ok(m) => maps.push((k, m)),
            Err(e) => failure = Some(e),
        }
    }
    // Sync point: every rank has mapped every file (or failed) before any creator unlinks.
    let all_ok = agree(tcp, failure.is_none())?;
    let own_map = match own {
        Ok((map, file)) if all_ok => {
            drop(file);
            map
        }
        _ => {
            tracing::warn!(
                rank,
                reason = failure.unwrap_or_else(|| "another rank failed".into()),
                "no shared gradient buffer; all-reduce stages copies"
            );
            return Ok(None);
        }
    };
    maps.push((rank, own_map));
    maps.sort_by_key(|(k, _)| *k);
    Ok(Some(maps.into_iter().map(|(_, m)| ManuallyDrop::new(m)).collect()))
}

/// True on every rank iff `ok` is true on every rank.
fn agree(tcp: &mut TcpCollective, ok: bool) -> Result<bool, CollectiveError> {
    let mut all = vec![0u8; tcp.world_size()];
    tcp.all_gather_bytes(&[u8::from(ok)], &mut all)?;
    Ok(all.iter().all(|b| *b == 1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_peer_that_drops_out_during_set_up_leaves_no_file() {
        let mut group = TcpCollective::loopback_group(3, Duration::from_secs(60)).unwrap();
        let mut quitter = group.pop().unwrap();
        let survivors: Vec<_> = group
            .into_iter()
            .map(|mut tcp| std::thread::spawn(move || map_peer_buffers(&mut tcp, 4096).map(|b| b.is_some())))
            .collect();
        // Rank 2 takes part in the exchange of names, so it learns the others' files, then leaves
        // before the agreement that would let them unlink.
        let mut names = vec![0u8; NAME_LEN * 3];
        quitter.all_gather_bytes(&[0u8; NAME_LEN], &mut names).unwrap();
        drop(quitter);
        for survivor in survivors {
            assert!(survivor.join().unwrap().is_err(), "the agreement fails without rank 2");
        }
        for rank in 0..2 {
            let path = decode_name(&names[rank * NAME_LEN..(rank + 1) * NAME_LEN]).expect("a file name");
            assert!(!path.exists(), "rank {rank} left {} behind", path.display());
        }
    }

    #[test]
    fn names_outside_dev_shm_are_refused() {
        assert!(decode_name(b"/dev/shm/rtrain-1-2-buf\0\0").is_some());
        for name in [&b"/etc/passwd"[..], b"/dev/shm/other", b"/dev/shm/sub/rtrain-1", b"", b"\xff\xfe"] {
            assert_eq!(decode_name(name), None, "{:?}", String::from_utf8_lossy(name));
        }
    }
}
