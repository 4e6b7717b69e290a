//! The lock that keeps two launches off one run directory: a POSIX record lock on
//! `<run>/launch.lock`. The kernel drops it when its holder exits, however it exits (kill -9
//! included), so a stale lock never blocks the next launch; while it is held, the kernel names
//! the holder's pid.

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
    /// Closing it releases the lock: no other handle on the lock file may be opened and closed
    /// by this process while it is held (POSIX locks belong to the process, not the handle).
    _file: File,
}

impl RunLock {
    /// Locks the run directory `dir` (which must exist) for this process, or says which process
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self, RunLockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| RunLockError::Io { path: path.clone(), source };
        let mut file = File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let mut lock = whole_file(libc::F_WRLCK);
        // SAFETY: fcntl on an open descriptor with a valid, initialised flock struct.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock as *const libc::flock) } != 0 {
            let err = std::io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::EACCES | libc::EAGAIN)) {
                return Err(io(err));
            }
            // SAFETY: as above; F_GETLK fills in the holder of a conflicting lock.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock as *mut libc::flock) } != 0 {
                return Err(io(std::io::Error::last_os_error()));
            }
            return Err(RunLockError::InUse { path: dir.to_path_buf(), holder: lock.l_pid });
        }
        // For people looking at the directory; the kernel's record is what counts.
        file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id())).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// The pid of the launch holding the lock of run directory `dir`, if one does.
pub fn holder(dir: &Path) -> Option<i32> {
    let file = File::open(dir.join(LOCK_FILE)).ok()?;
    let mut lock = whole_file(libc::F_WRLCK);
    // SAFETY: fcntl on an open descriptor with a valid, initialised flock struct; F_GETLK only
    // reads who holds a conflicting lock (this process takes none, so closing the file is safe).
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock as *mut libc::flock) } != 0 {
        return None;
    }
    (lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid)
}

fn whole_file(kind: i32) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (start 0, length 0 = whole file).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}
