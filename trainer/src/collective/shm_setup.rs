//! Setting up the `shm` backend's memory: checking that the ranks share a host, creating,
//! exchanging, mapping and unlinking the `/dev/shm` files. Every step that can fail on one rank
//! ends in an agreement over the TCP ring, so all ranks fail (or succeed) alike.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

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

/// A new zero-filled file under /dev/shm of `len` bytes, with its pages reserved up front (so a
/// full /dev/shm fails here, not with SIGBUS at first touch).
fn create_shm_file(tag: &str, len: usize) -> Result<(PathBuf, File), String> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = PathBuf::from(SHM_DIR).join(format!("rtrain-{}-{nanos}-{tag}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a file this function owns.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    if rc != 0 {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "cannot reserve {len} bytes in {SHM_DIR}: {} ({SHM_DIR} may be too small: \
             `df -h {SHM_DIR}`; in Docker, raise --shm-size)",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    Ok((path, file))
}

fn map(file: &File, len: usize, path: &Path) -> Result<MmapMut, String> {
    let actual = file.metadata().map(|m| m.len()).unwrap_or(0);
    if actual != len as u64 {
        return Err(format!("{} holds {actual} bytes, expected {len}", path.display()));
    }
    // SAFETY: the file is private to the gang (mode 0600, unique name) and only accessed through
    // the protocol of this module.
    unsafe { MmapMut::map_mut(file) }.map_err(|e| format!("cannot map {}: {e}", path.display()))
}

/// Maps a file another rank created.
fn open_and_map(path: &Path, len: usize) -> Result<MmapMut, String> {
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

fn decode_name(bytes: &[u8]) -> Option<PathBuf> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    (end > 0).then(|| PathBuf::from(String::from_utf8_lossy(&bytes[..end]).into_owned()))
}

/// Rank 0 creates the gang file and broadcasts its name; the others map it; once all have, rank
/// 0 unlinks it. Any rank's failure fails every rank.
pub(super) fn map_gang_file(tcp: &mut TcpCollective, len: usize) -> Result<MmapMut, CollectiveError> {
    let rank = tcp.rank();
    let mut name = [0u8; NAME_LEN];
    let mut created = None;
    let mut failure = None;
    if rank == 0 {
        match create_shm_file("gang", len) {
            Ok((path, file)) => {
                name = encode_name(&path);
                created = Some((path, file));
            }
            Err(e) => failure = Some(e),
        }
    }
    tcp.broadcast_bytes(&mut name, 0)?;
    let mapped = match (&created, decode_name(&name)) {
        (Some((path, file)), _) => map(file, len, path),
        (None, Some(path)) => open_and_map(&path, len),
        (None, None) => Err(failure.take().unwrap_or_else(|| "rank 0 could not create the gang's segment".into())),
    };
    let all_ok = agree(tcp, mapped.is_ok())?;
    if let Some((path, _)) = &created {
        let _ = std::fs::remove_file(path);
    }
    match (mapped, all_ok) {
        (Ok(m), true) => Ok(m),
        (Err(e), _) => Err(unavailable(e)),
        (Ok(_), false) => Err(unavailable("another rank could not map the gang's shared memory (see its log)".into())),
    }
}

/// Each rank creates and maps its own buffer file, the names go round, every rank maps every
/// peer's; then each unlinks its own. `None` on every rank if any rank failed (logged).
pub(super) fn map_peer_buffers(tcp: &mut TcpCollective, bytes: usize) -> Result<Option<Vec<usize>>, CollectiveError> {
    let (rank, world) = (tcp.rank(), tcp.world_size());
    let own = create_shm_file("buf", bytes).and_then(|(path, file)| Ok((map(&file, bytes, &path)?, path)));
    let name = own.as_ref().map_or([0u8; NAME_LEN], |(_, path)| encode_name(path));
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
    let all_ok = agree(tcp, failure.is_none())?;
    let Ok((own_map, own_path)) = own else {
        tracing::warn!(
            rank,
            reason = failure.unwrap_or_default(),
            "no shared gradient buffer; all-reduce stages copies"
        );
        return Ok(None);
    };
    let _ = std::fs::remove_file(&own_path);
    if !all_ok {
        tracing::warn!(
            rank,
            reason = failure.unwrap_or_else(|| "another rank failed".into()),
            "no shared gradient buffer; all-reduce stages copies"
        );
        return Ok(None);
    }
    maps.push((rank, own_map));
    maps.sort_by_key(|(k, _)| *k);
    // The mappings stay for the life of the process: tensors over them may be kept anywhere.
    Ok(Some(maps.into_iter().map(|(_, m)| std::mem::ManuallyDrop::new(m).as_mut_ptr() as usize).collect()))
}

/// True on every rank iff `ok` is true on every rank.
fn agree(tcp: &mut TcpCollective, ok: bool) -> Result<bool, CollectiveError> {
    let mut all = vec![0u8; tcp.world_size()];
    tcp.all_gather_bytes(&[u8::from(ok)], &mut all)?;
    Ok(all.iter().all(|b| *b == 1))
}
