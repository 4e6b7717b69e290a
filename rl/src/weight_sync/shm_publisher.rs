//! The trainer's side of same-host weight sync: one shared-memory segment per weight channel,
//! written once per version, which every rollout actor on the host maps.

use std::path::{Path, PathBuf};

use tch::Tensor;

use super::error::{SyncResult, WeightSyncError};
use super::segment::Segment;
use super::table::{WeightTable, readable};
use super::wire::random_u64;

const SHM_DIR: &str = "/dev/shm";

/// The `/dev/shm` file of one job's weight channel: `rtrain-<job>-weights-<channel>`. A
/// restarted publisher creates a new file under the same name; subscribers notice and remap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmChannel {
    path: PathBuf,
}

impl ShmChannel {
    /// The channel `channel` (e.g. "policy") of job `job`.
    pub fn new(job: &str, channel: &str) -> SyncResult<Self> {
        check_name("job name", job)?;
        check_name("weight channel", channel)?;
        Ok(ShmChannel { path: Path::new(SHM_DIR).join(format!("rtrain-{job}-weights-{channel}")) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn check_name(what: &'static str, value: &str) -> SyncResult<()> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok { Ok(()) } else { Err(WeightSyncError::InvalidName { what, value: value.to_string() }) }
}

/// Writes versions of a fixed tensor set into a channel's segment. One publisher per channel;
/// the segment is unlinked when it drops (a killed publisher leaves it behind until the next
/// publisher of the channel replaces it).
pub struct WeightPublisher {
    segment: Segment,
    last_version: Option<u64>,
}

impl std::fmt::Debug for WeightPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightPublisher")
            .field("path", &self.segment.path())
            .field("generation", &self.segment.generation)
            .field("tensors", &self.segment.table.entries().len())
            .field("bytes", &self.segment.table.data_bytes())
            .field("last_version", &self.last_version)
            .finish()
    }
}

impl WeightPublisher {
    /// Creates the channel's segment, sized for two copies of `tensors` (their names, dtypes and
    /// shapes; the values are not published). Fails with [`WeightSyncError::ShmTooSmall`] when
    /// `/dev/shm` cannot hold it.
    pub fn create(channel: &ShmChannel, tensors: &[(String, Tensor)]) -> SyncResult<Self> {
        let table = WeightTable::from_tensors(tensors)?;
        let generation = random_u64()?.max(1);
        let segment = Segment::create(channel.path(), table, generation)?;
        Ok(WeightPublisher { segment, last_version: None })
    }

    /// Publishes `tensors` as `version`, which must be newer than the last one this publisher
    /// published. The set must match the one the segment was created for (any order). Costs one
    /// copy of the weights (plus a device-to-host copy for tensors not on the CPU); never waits
    /// for subscribers.
    pub fn publish(&mut self, version: u64, tensors: &[(String, Tensor)]) -> SyncResult<()> {
        if let Some(last) = self.last_version.filter(|last| version <= *last) {
            return Err(WeightSyncError::VersionNotNewer { version, last });
        }
        let entries = self.segment.table.match_tensors(tensors)?;
        // Every fallible step happens before the slot is marked as being written.
        let sources = tensors.iter().map(|(name, t)| readable(name, t)).collect::<SyncResult<Vec<_>>>()?;
        let slot = self.segment.latest_slot()?.map_or(0, |newest| 1 - newest);
        let base = self.segment.slot_base(slot);
        let seq = self.segment.begin_write(slot);
        for (src, entry) in sources.iter().zip(entries) {
            if entry.bytes == 0 {
                continue;
            }
            // SAFETY: `src` is a contiguous CPU tensor of entry.bytes bytes (matched dtype and
            // shape); the destination lies in `slot`'s image (the table fits data_bytes <=
            // slot_stride). Readers never write; they discard copies that overlap this write.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.data_ptr().cast::<u8>(),
                    base.add(entry.offset as usize),
                    entry.bytes as usize,
                )
            };
        }
        self.segment.end_write(slot, seq, version);
        self.last_version = Some(version);
        Ok(())
    }

    /// Tells this publisher's segment from an earlier or later publisher's of the same channel.
    pub fn generation(&self) -> u64 {
        self.segment.generation
    }

    pub fn table(&self) -> &WeightTable {
        &self.segment.table
    }

    pub fn path(&self) -> &Path {
        self.segment.path()
    }
}

impl Drop for WeightPublisher {
    fn drop(&mut self) {
        // Unlinks only its own file: a newer publisher may already have replaced it. Mapped
        // subscribers keep their pages until they unmap.
        if let Ok(true) = self.segment.still_at_path() {
            let _ = std::fs::remove_file(self.segment.path());
        }
    }
}
