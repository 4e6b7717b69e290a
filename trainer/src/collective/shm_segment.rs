//! The layout of the `shm` gang's segment and the only ways into it.
//!
//! ```text
//! [header line][control line 0] … [control line n-1][slot set 0: n slots][slot set 1: n slots]
//! ```
//!
//! Every rank's process writes this memory concurrently, so no Rust reference to plain data in
//! it ever exists: the header and control lines are reached as atomics (which may be shared),
//! and the slots as raw pointers derived from the one base pointer of the mapping, read and
//! written with `ptr::copy_nonoverlapping` under the barrier protocol of `shm.rs`.

use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;

use super::op_desc::OpWords;

/// Header and control lines are two cache lines each, so ranks never write the same line.
const LINE: usize = 128;

/// A rank's control line: its barrier counter and the operation it announced last.
#[repr(C)]
pub(super) struct ControlLine {
    pub arrived: AtomicU64,
    /// [`OpWords`] of the operation, then its offset in a shared buffer (or [`STAGED`]).
    pub op: [AtomicU64; 4],
}

/// The offset word of an operation that stages its data through the slots.
pub(super) const STAGED: u64 = u64::MAX;

/// The segment's first line.
#[repr(C)]
struct Header {
    /// 0 while the gang is healthy; set once, by the first rank that fails (see [`Poison`]).
    poisoned: AtomicU64,
}

/// Why a rank gave up on the gang, as every other rank reads it from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Poison {
    /// Waited for `peer` until the collective timeout.
    TimedOut { peer: usize },
    /// The ranks announced different operations.
    Disagreed,
    /// Lost its connection to `peer`: that process exited or failed.
    LostPeer { peer: usize },
    /// Any other error.
    Failed,
}

impl Poison {
    fn code(self) -> (u64, usize) {
        match self {
            Poison::TimedOut { peer } => (1, peer),
            Poison::Disagreed => (2, 0),
            Poison::LostPeer { peer } => (3, peer),
            Poison::Failed => (4, 0),
        }
    }

    fn from_code(code: u64, peer: usize) -> Poison {
        match code {
            1 => Poison::TimedOut { peer },
            2 => Poison::Disagreed,
            3 => Poison::LostPeer { peer },
            _ => Poison::Failed,
        }
    }
}

/// The mapped segment of one gang.
pub(super) struct GangSegment {
    map: MmapRaw,
    world: usize,
    slot_bytes: usize,
}

impl GangSegment {
    /// Bytes a gang of `world` ranks with `slot_bytes` slots needs.
    pub(super) fn len(world: usize, slot_bytes: usize) -> usize {
        LINE * (1 + world) + 2 * world * slot_bytes
    }

    /// Wraps a zero-filled mapping of at least [`Self::len`] bytes (`slot_bytes` a multiple of 64,
    /// so that every slot is aligned for f64).
    pub(super) fn new(map: MmapRaw, world: usize, slot_bytes: usize) -> Result<Self, String> {
        let needed = Self::len(world, slot_bytes);
        if map.len() < needed || !slot_bytes.is_multiple_of(64) || !(map.as_mut_ptr() as usize).is_multiple_of(LINE) {
            return Err(format!("a gang segment of {} bytes cannot hold {needed}", map.len()));
        }
        Ok(GangSegment { map, world, slot_bytes })
    }

    pub(super) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts page-aligned with the header line (checked length); Header
        // holds only atomics, which every process accesses atomically.
        unsafe { &*self.map.as_mut_ptr().cast::<Header>() }
    }

    pub(super) fn line(&self, rank: usize) -> &ControlLine {
        assert!(rank < self.world, "rank {rank} has no control line in a world of {}", self.world);
        // SAFETY: within the checked length and 128-byte aligned; ControlLine holds only atomics.
        unsafe { &*self.map.as_mut_ptr().add(LINE * (1 + rank)).cast::<ControlLine>() }
    }

    /// Start of `rank`'s slot in slot set `set`; `slot_bytes` long, aligned for f64. Callers read
    /// and write it only through raw pointers, as the barrier protocol allows.
    pub(super) fn slot(&self, set: usize, rank: usize) -> *mut u8 {
        assert!(set < 2 && rank < self.world, "no slot {set}/{rank} in a world of {}", self.world);
        let at = LINE * (1 + self.world) + (set * self.world + rank) * self.slot_bytes;
        // SAFETY: within the checked length of the mapping.
        unsafe { self.map.as_mut_ptr().add(at) }
    }

    /// Publishes this rank's operation, for [`Self::announced`]. Ordered before the next barrier
    /// arrival (a release store), which peers read before the words (an acquire load).
    pub(super) fn announce(&self, rank: usize, words: OpWords, offset: u64) {
        let line = self.line(rank);
        for (slot, value) in line.op.iter().zip(words.into_iter().chain([offset])) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    /// `rank`'s last announcement: its words and offset.
    pub(super) fn announced(&self, rank: usize) -> (OpWords, u64) {
        let op = &self.line(rank).op;
        let word = |i: usize| op[i].load(Ordering::Relaxed);
        ([word(0), word(1), word(2)], word(3))
    }

    /// Marks the gang as failed by rank `by`, unless a rank did so first. Every waiting rank
    /// sees it at its next poll and fails too.
    pub(super) fn poison(&self, by: usize, why: Poison) {
        let (code, peer) = why.code();
        let word = (1 + by as u64) | code << 24 | (peer as u64) << 32;
        let _ = self.header().poisoned.compare_exchange(0, word, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The rank that poisoned the gang and why, or `None` while it is healthy.
    pub(super) fn poisoned(&self) -> Option<(usize, Poison)> {
        let word = self.header().poisoned.load(Ordering::Acquire);
        (word != 0)
            .then(|| (((word & 0xff_ffff) - 1) as usize, Poison::from_code((word >> 24) & 0xff, (word >> 32) as usize)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn segment(world: usize) -> GangSegment {
        let len = GangSegment::len(world, 4096);
        let map = memmap2::MmapOptions::new().len(len).map_anon().unwrap();
        GangSegment::new(MmapRaw::from(map), world, 4096).unwrap()
    }

    #[test]
    fn the_first_poison_wins_and_round_trips() {
        let gang = segment(4);
        assert_eq!(gang.poisoned(), None);
        gang.poison(1, Poison::LostPeer { peer: 2 });
        gang.poison(3, Poison::TimedOut { peer: 0 });
        assert_eq!(gang.poisoned(), Some((1, Poison::LostPeer { peer: 2 })));
    }

    #[test]
    fn lines_and_slots_do_not_overlap() {
        let gang = segment(3);
        let base = gang.header() as *const Header as usize;
        let lines: Vec<usize> = (0..3).map(|r| gang.line(r) as *const ControlLine as usize - base).collect();
        assert_eq!(lines, [128, 256, 384]);
        assert!(size_of::<ControlLine>() <= LINE);
        assert_eq!(gang.slot(0, 0) as usize - base, 512);
        assert_eq!(gang.slot(1, 2) as usize - base, 512 + 5 * 4096);
        gang.announce(2, [1, 2, 3], STAGED);
        assert_eq!(gang.announced(2), ([1, 2, 3], STAGED));
        assert_eq!(gang.announced(1), ([0, 0, 0], 0));
    }
}
