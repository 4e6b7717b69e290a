//! The lock that keeps two launches off one run directory: an open-file-description record lock
//! (`F_OFD_SETLK`) on `<run>/launch.lock`, which holds the holder's pid. The kernel drops it when
//! its holder exits, however it exits (kill -9 included), so a stale lock never blocks the next
//! launch. Unlike a classic POSIX lock, it belongs to the open file, not the process: the launch
//! itself may look at its own run (its dashboard does) without releasing it.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name inside the run directory.
pub const LOCK_FILE: &str = "launch.lock";

/// Why a run directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    #[error(
        "{} is in use by another launch (rtrain pid {holder}); wait for it to end or stop it \
         (kill {holder}), or choose another job.name", path.display()
    )]
    InUse { path: PathBuf, holder: i32 },
    #[error("cannot lock {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// A held lock on a run directory; released when dropped or when the process ends.
#[derive(Debug)]
pub struct RunLock {
    /// Closing it releases the lock.
    _file: File,
}

impl RunLock {
    /// Locks the run directory `dir` (which must exist) for this process, or says which process
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self, RunLockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| RunLockError::Io { path: path.clone(), source };
        let mut file = File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let lock = whole_file(libc::F_WRLCK);
        // SAFETY: fcntl on an open descriptor with a valid, initialised flock struct.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock as *const libc::flock) } != 0 {
            let err = std::io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::EACCES | libc::EAGAIN)) {
                return Err(io(err));
            }
            return Err(RunLockError::InUse { path: dir.to_path_buf(), holder: written_pid(&path).unwrap_or(0) });
        }
        // For people looking at the directory; the kernel's record is what counts.
        file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id())).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// The pid of the launch holding the lock of run directory `dir`, if one does (0 when the holder
/// has not written it yet).
pub fn holder(dir: &Path) -> Option<i32> {
    let path = dir.join(LOCK_FILE);
    let file = File::open(&path).ok()?;
    let mut lock = whole_file(libc::F_WRLCK);
    // SAFETY: fcntl on an open descriptor with a valid, initialised flock struct; F_OFD_GETLK only
    // reads whether a conflicting lock is held, and takes none.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock as *mut libc::flock) } != 0 {
        return None;
    }
    (lock.l_type != libc::F_UNLCK as libc::c_short).then(|| written_pid(&path).unwrap_or(0))
}

/// The pid the holder wrote into the lock file (open-file-description locks do not name it).
fn written_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn whole_file(kind: i32) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (start 0, length 0 = whole file,
    // and l_pid 0, which open-file-description locks require).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looking_at_a_held_lock_does_not_release_it() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let lock = RunLock::acquire(dir.path())?;
        // The holder itself looks (as its dashboard and status do), more than once.
        assert_eq!(holder(dir.path()), Some(std::process::id() as i32));
        assert_eq!(holder(dir.path()), Some(std::process::id() as i32));
        match RunLock::acquire(dir.path()) {
            Err(RunLockError::InUse { holder, .. }) => assert_eq!(holder, std::process::id() as i32),
            other => panic!("a second lock was granted: {other:?}"),
        }
        drop(lock);
        assert_eq!(holder(dir.path()), None);
        RunLock::acquire(dir.path())?;
        Ok(())
    }
}
