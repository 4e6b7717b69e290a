//! The rollout actor's side of same-host weight sync: maps the channel's segment and copies the
//! newest complete version straight into the model's tensors.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::error::{SyncResult, WeightSyncError};
use super::segment::Segment;
use super::shm_publisher::ShmChannel;
use super::table::{TensorEntry, WeightTable, direct_ptr};

/// A published version as a subscriber knows it: the publisher's generation (new after every
/// publisher restart) and the version number within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SyncedVersion {
    pub generation: u64,
    pub version: u64,
}

impl SyncedVersion {
    /// Whether `other` should replace this one: a newer version, or any version of another
    /// publisher generation (a restarted trainer may resume from an older checkpoint).
    pub fn is_superseded_by(&self, other: SyncedVersion) -> bool {
        other.generation != self.generation || other.version > self.version
    }
}

/// What one sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing has been published yet (no segment, or a segment with no version).
    NotPublished,
    /// The newest published version is the one already held.
    UpToDate(SyncedVersion),
    /// A newer version was loaded; `restarted` when it comes from a new publisher generation.
    Loaded { version: SyncedVersion, restarted: bool },
}

/// Loads the newest version of a channel's weights. Keeps the segment mapped between syncs, so
/// a sync that finds nothing new costs a `stat` and two atomic loads.
pub struct WeightSubscriber {
    path: PathBuf,
    segment: Option<Segment>,
    /// Whether a segment was ever found: its disappearance is then an error, not "not yet".
    seen_segment: bool,
    held: Option<SyncedVersion>,
    timeout: Duration,
}

impl std::fmt::Debug for WeightSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSubscriber").field("path", &self.path).field("held", &self.held).finish()
    }
}

impl WeightSubscriber {
    /// A subscriber to `channel`; maps nothing until the first sync, so it may start before the
    /// publisher.
    pub fn new(channel: &ShmChannel) -> Self {
        WeightSubscriber {
            path: channel.path().to_path_buf(),
            segment: None,
            seen_segment: false,
            held: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// How long a sync may keep retrying while the publisher overwrites the slot it reads
    /// (default 10 s), before failing with [`WeightSyncError::Contended`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The version last loaded by this subscriber.
    pub fn held(&self) -> Option<SyncedVersion> {
        self.held
    }

    /// The tensor table of the segment mapped now (after a sync found one), to allocate
    /// tensors with [`WeightTable::zeros`].
    pub fn table(&mut self) -> SyncResult<Option<&WeightTable>> {
        self.refresh()?;
        Ok(self.segment.as_ref().map(|s| &s.table))
    }

    /// Whether the process that created the mapped segment still exists (a hint: pids are
    /// reused). `None` before a segment was mapped.
    pub fn publisher_alive(&self) -> Option<bool> {
        let pid = self.segment.as_ref()?.publisher_pid;
        let pid = libc::pid_t::try_from(pid).ok().filter(|p| *p > 0)?;
        // SAFETY: signal 0 only checks for the process's existence.
        let rc = unsafe { libc::kill(pid, 0) };
        Some(rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
    }

    /// Copies the newest version into `tensors` (matched by name; every published tensor must be
    /// there with its dtype and shape) if it supersedes the held one. CPU contiguous tensors are
    /// written in place, others through a staging copy and `copy_`; nothing is reallocated.
    ///
    /// Fails naming the tensor when the sets differ, with [`WeightSyncError::SegmentGone`] once
    /// a mapped segment has disappeared, and with [`WeightSyncError::Contended`] when no
    /// complete copy could be made in time; after `Contended` the tensors hold a mix of
    /// versions and must not be used until a sync succeeds.
    pub fn sync_into(&mut self, tensors: &mut [(String, Tensor)]) -> SyncResult<SyncOutcome> {
        self.refresh()?;
        let Some(segment) = &self.segment else { return Ok(SyncOutcome::NotPublished) };
        let entries = segment.table.match_tensors(tensors)?;
        // Allocated once something newer is found: polls that find nothing stay cheap.
        let mut staging: Option<Vec<Option<Tensor>>> = None;
        let start = Instant::now();
        let mut attempt = 0u32;
        let version = loop {
            let Some(slot) = segment.latest_slot()? else { return Ok(SyncOutcome::NotPublished) };
            if let Some((seq, version)) = segment.read_begin(slot) {
                let found = SyncedVersion { generation: segment.generation, version };
                if let Some(held) = self.held.filter(|h| !h.is_superseded_by(found)) {
                    return Ok(SyncOutcome::UpToDate(held));
                }
                let staging = match &mut staging {
                    Some(staging) => staging,
                    None => staging.insert(staging_tensors(tensors, &entries)?),
                };
                let base = segment.slot_base(slot);
                for (((_, t), entry), staged) in tensors.iter().zip(&entries).zip(staging.iter()) {
                    let dst = staged.as_ref().unwrap_or(t);
                    if entry.bytes == 0 {
                        continue;
                    }
                    let Some(dst) = direct_ptr(dst) else { continue };
                    // SAFETY: `dst` is a contiguous CPU tensor of entry.bytes bytes (dtype and
                    // shape matched); the source lies in the slot's image. The source may be
                    // overwritten meanwhile: such a copy is detected below and discarded.
                    unsafe {
                        std::ptr::copy_nonoverlapping(base.add(entry.offset as usize), dst, entry.bytes as usize)
                    };
                }
                if segment.read_validate(slot, seq) {
                    break found;
                }
            }
            if start.elapsed() > self.timeout {
                return Err(WeightSyncError::Contended { path: self.path.clone(), waited: start.elapsed() });
            }
            backoff(attempt);
            attempt += 1;
        };
        let _guard = tch::no_grad_guard();
        for ((name, t), staged) in tensors.iter_mut().zip(staging.unwrap_or_default()) {
            if let Some(staged) = staged {
                t.f_copy_(&staged).map_err(|source| WeightSyncError::Torch { name: name.clone(), source })?;
            }
        }
        let restarted = self.held.is_some_and(|h| h.generation != version.generation);
        self.held = Some(version);
        Ok(SyncOutcome::Loaded { version, restarted })
    }

    /// Maps the segment now at the channel's path if it is not the one mapped.
    fn refresh(&mut self) -> SyncResult<()> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if self.segment.as_ref().is_some_and(|s| s.is_at_path(&meta)) => Ok(()),
            Ok(_) => {
                self.segment = Segment::open(&self.path)?;
                self.seen_segment |= self.segment.is_some();
                if self.segment.is_none() && self.seen_segment {
                    return Err(self.gone());
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.segment = None;
                if self.seen_segment { Err(self.gone()) } else { Ok(()) }
            }
            Err(source) => Err(WeightSyncError::Shm { op: "cannot stat", path: self.path.clone(), source }),
        }
    }

    fn gone(&self) -> WeightSyncError {
        WeightSyncError::SegmentGone { path: self.path.clone(), last_version: self.held.map(|h| h.version) }
    }
}

/// A CPU staging tensor for each of `tensors` that cannot be written in place.
fn staging_tensors(tensors: &[(String, Tensor)], entries: &[&TensorEntry]) -> SyncResult<Vec<Option<Tensor>>> {
    let stage = |(name, t): &(String, Tensor), entry: &&TensorEntry| match direct_ptr(t) {
        Some(_) => Ok(None),
        None => Tensor::f_empty(&entry.shape, (entry.dtype.kind(), Device::Cpu))
            .map(Some)
            .map_err(|source| WeightSyncError::Torch { name: name.clone(), source }),
    };
    tensors.iter().zip(entries).map(|(t, e)| stage(t, e)).collect()
}

/// Waiting for the publisher to finish a write: spin briefly, then yield, then sleep.
fn backoff(attempt: u32) {
    match attempt {
        0..16 => std::hint::spin_loop(),
        16..64 => std::thread::yield_now(),
        _ => std::thread::sleep(Duration::from_micros(50)),
    }
}
