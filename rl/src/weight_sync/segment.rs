//! The shared-memory segment of one weight channel, and its seqlock.
//!
//! Layout (little-endian, every offset from the mapping's base):
//!
//! ```text
//!   0  magic "RTRWGHT\0", format u32, table_len u32, generation u64, publisher pid u64,
//!      data_bytes u64, slot_stride u64, data_offset u64, total_len u64       (fixed at creation)
//!  64  latest: AtomicU64 — 0 before the first publish, else 1 + the slot holding the newest version
//! 128  slot 0: seq AtomicU64, version AtomicU64      192  slot 1: the same
//! 256  tensor table (see `table.rs`), then slot 0's image at data_offset, slot 1's at
//!      data_offset + slot_stride (both page-aligned)
//! ```
//!
//! The publisher writes a version into the slot `latest` does not point at: it makes the slot's
//! seq odd, copies, stores the version, makes seq even (Release), then points `latest` at the
//! slot (Release). A reader takes `latest`, reads the slot's seq (Acquire, must be even), copies,
//! fences (Acquire) and rereads seq: equal means no write overlapped the copy. The writer never
//! waits for readers; a reader retries only if the publisher wrote two versions during one copy.
//!
//! Everything but the atomics is written before the file gets its public name (created under a
//! temporary name, then renamed), so a reader never sees a half-written header.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering, fence};

use memmap2::{MmapOptions, MmapRaw};

use super::error::{SyncResult, WeightSyncError};
use super::table::WeightTable;

const MAGIC: [u8; 8] = *b"RTRWGHT\0";
/// Revision of the layout above.
pub(crate) const FORMAT: u32 = 1;
const LATEST: usize = 64;
const SLOTS: usize = 128;
const SLOT_LINE: usize = 64;
const TABLE: usize = 256;
const PAGE: u64 = 4096;

/// Identity of a segment file: a restarted publisher makes a new file under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileId { dev: meta.dev(), ino: meta.ino() }
    }
}

/// A mapped segment. All access goes through raw pointers derived from `map`'s base; the only
/// references made into it are to the atomics.
pub(crate) struct Segment {
    map: MmapRaw,
    path: PathBuf,
    id: FileId,
    pub(crate) generation: u64,
    pub(crate) publisher_pid: u32,
    pub(crate) table: WeightTable,
    data_offset: u64,
    slot_stride: u64,
}

impl Segment {
    /// Creates, sizes (all pages reserved up front) and maps the segment for `table`, then
    /// publishes it at `path` by rename, replacing any segment a previous publisher left there.
    pub(crate) fn create(path: &Path, table: WeightTable, generation: u64) -> SyncResult<Self> {
        let encoded = table.encode();
        let table_len = u32::try_from(encoded.len())
            .map_err(|_| WeightSyncError::corrupt(path.display(), "tensor table larger than 4 GiB"))?;
        let data_offset = (TABLE as u64 + u64::from(table_len)).div_ceil(PAGE) * PAGE;
        let slot_stride = table.data_bytes().div_ceil(PAGE).max(1) * PAGE;
        let total = slot_stride
            .checked_mul(2)
            .and_then(|s| s.checked_add(data_offset))
            .filter(|t| usize::try_from(*t).is_ok() && i64::try_from(*t).is_ok())
            .ok_or_else(|| WeightSyncError::corrupt(path.display(), "tensor set too large to map"))?;

        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{generation:016x}.tmp"));
        let tmp = PathBuf::from(tmp);
        let shm = |op, source| WeightSyncError::Shm { op, path: tmp.clone(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| shm("cannot create", e))?;
        let unlink_tmp = RemoveOnDrop(Some(tmp.clone()));
        // SAFETY: plain syscall on a file this function owns.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
        if rc != 0 {
            let source = std::io::Error::from_raw_os_error(rc);
            return Err(WeightSyncError::ShmTooSmall { path: path.to_path_buf(), bytes: total, source });
        }
        let map = MmapOptions::new().populate().map_raw(&file).map_err(|e| shm("cannot map", e))?;
        let base = map.as_mut_ptr();
        let mut header = Vec::with_capacity(TABLE);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT.to_le_bytes());
        header.extend_from_slice(&table_len.to_le_bytes());
        for field in [generation, u64::from(std::process::id()), table.data_bytes(), slot_stride, data_offset, total] {
            header.extend_from_slice(&field.to_le_bytes());
        }
        // SAFETY: the mapping is `total` bytes, more than TABLE + table_len; nobody else can have
        // opened the file yet (new name, mode 0600, not yet renamed into place).
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), base, header.len());
            std::ptr::copy_nonoverlapping(encoded.as_ptr(), base.add(TABLE), encoded.len());
        }
        let id = file.metadata().map(|m| FileId::of(&m)).map_err(|e| shm("cannot stat", e))?;
        std::fs::rename(&tmp, path).map_err(|e| shm("cannot rename into place", e))?;
        std::mem::forget(unlink_tmp);
        Ok(Segment {
            map,
            path: path.to_path_buf(),
            id,
            generation,
            publisher_pid: std::process::id(),
            table,
            data_offset,
            slot_stride,
        })
    }

    /// Maps the segment at `path` read-only and checks its header. `Ok(None)` if there is none.
    pub(crate) fn open(path: &Path) -> SyncResult<Option<Self>> {
        let shm = |op, source| WeightSyncError::Shm { op, path: path.to_path_buf(), source };
        // No symlinks: the name lives in a world-writable directory.
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(shm("cannot open", e)),
        };
        let meta = file.metadata().map_err(|e| shm("cannot stat", e))?;
        let bad = |reason: String| WeightSyncError::corrupt(path.display(), reason);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(bad(format!("owned by uid {}, not by this user (uid {me})", meta.uid())));
        }
        if meta.len() < TABLE as u64 {
            return Err(bad(format!("{} bytes, shorter than the header", meta.len())));
        }
        let map = MmapOptions::new().populate().map_raw_read_only(&file).map_err(|e| shm("cannot map", e))?;
        let mut header = [0u8; TABLE];
        // SAFETY: the mapping holds at least TABLE bytes (checked above; the publisher never
        // shrinks the file); the header is written before the file is renamed into place.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr(), header.as_mut_ptr(), TABLE) };
        let u32_at = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if header[..8] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        let format = u32_at(8);
        if format != FORMAT {
            let source_name = path.display().to_string();
            return Err(WeightSyncError::FormatVersion { source_name, found: format, expected: FORMAT });
        }
        let table_len = u64::from(u32_at(12));
        let [generation, pid, data_bytes, slot_stride, data_offset, total] = [16, 24, 32, 40, 48, 56].map(u64_at);
        let fits = total == meta.len()
            && data_offset >= TABLE as u64 + table_len
            && data_offset.is_multiple_of(PAGE)
            && slot_stride >= data_bytes
            && slot_stride.checked_mul(2).and_then(|s| s.checked_add(data_offset)) == Some(total);
        if !fits {
            return Err(bad(format!(
                "inconsistent layout: table {table_len} B, image {data_bytes} B, stride {slot_stride}, \
                 data at {data_offset}, total {total} of a {} B file",
                meta.len()
            )));
        }
        let mut encoded = vec![0u8; table_len as usize];
        // SAFETY: TABLE + table_len <= data_offset <= total == the mapping's length.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(TABLE), encoded.as_mut_ptr(), encoded.len()) };
        let table = WeightTable::decode(&encoded, data_bytes, &path.display().to_string())?;
        Ok(Some(Segment {
            map,
            path: path.to_path_buf(),
            id: FileId::of(&meta),
            generation,
            publisher_pid: u32::try_from(pid).unwrap_or(0),
            table,
            data_offset,
            slot_stride,
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` still names this file (the publisher has not exited or been replaced).
    pub(crate) fn still_at_path(&self) -> std::io::Result<bool> {
        Ok(FileId::of(&std::fs::metadata(&self.path)?) == self.id)
    }

    pub(crate) fn is_at_path(&self, meta: &std::fs::Metadata) -> bool {
        FileId::of(meta) == self.id
    }

    fn atomic(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: offset is one of the 8-aligned control words below TABLE, inside the mapping
        // (page-aligned base). Other processes change these words only through atomic
        // operations, so a shared reference to an AtomicU64 there is sound.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(offset).cast::<u64>()) }
    }

    fn seq(&self, slot: usize) -> &AtomicU64 {
        self.atomic(SLOTS + slot * SLOT_LINE)
    }

    fn slot_version(&self, slot: usize) -> &AtomicU64 {
        self.atomic(SLOTS + slot * SLOT_LINE + 8)
    }

    /// The slot holding the newest complete version, if any was published.
    pub(crate) fn latest_slot(&self) -> SyncResult<Option<usize>> {
        match self.atomic(LATEST).load(Ordering::Acquire) {
            0 => Ok(None),
            n @ 1..=2 => Ok(Some(n as usize - 1)),
            n => Err(WeightSyncError::corrupt(self.path.display(), format!("latest slot word {n}"))),
        }
    }

    /// Base address of `slot`'s image. Reading or writing through it must follow the seqlock.
    pub(crate) fn slot_base(&self, slot: usize) -> *mut u8 {
        let offset = self.data_offset + slot as u64 * self.slot_stride;
        // SAFETY: slot < 2 and data_offset + 2 * slot_stride == the mapping's length.
        unsafe { self.map.as_mut_ptr().add(offset as usize) }
    }

    /// Writer side: marks `slot` as being written. Only the publisher calls this.
    pub(crate) fn begin_write(&self, slot: usize) -> u64 {
        let seq = self.seq(slot).load(Ordering::Relaxed) | 1;
        self.seq(slot).store(seq, Ordering::Relaxed);
        // Orders the odd seq before the image writes that follow (Boehm's seqlock writer).
        fence(Ordering::Release);
        seq
    }

    /// Writer side: `slot` now holds `version` in full; make it the newest.
    pub(crate) fn end_write(&self, slot: usize, seq: u64, version: u64) {
        self.slot_version(slot).store(version, Ordering::Relaxed);
        self.seq(slot).store(seq + 1, Ordering::Release);
        self.atomic(LATEST).store(slot as u64 + 1, Ordering::Release);
    }

    /// Reader side: `Some((seq, version))` if `slot` is not being written now.
    pub(crate) fn read_begin(&self, slot: usize) -> Option<(u64, u64)> {
        let seq = self.seq(slot).load(Ordering::Acquire);
        let version = self.slot_version(slot).load(Ordering::Relaxed);
        seq.is_multiple_of(2).then_some((seq, version))
    }

    /// Reader side: whether nothing was written to `slot` since [`Self::read_begin`] gave `seq`.
    pub(crate) fn read_validate(&self, slot: usize, seq: u64) -> bool {
        // Orders the image reads before the second seq read.
        fence(Ordering::Acquire);
        self.seq(slot).load(Ordering::Relaxed) == seq
    }
}

/// Removes a file on drop unless forgotten: the temporary name of a segment being created.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
