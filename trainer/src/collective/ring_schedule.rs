//! Ring schedules as data: which byte ranges a rank sends to its successor and receives from its
//! predecessor, in order, and which local progress each transfer must wait for.
//!
//! A schedule is built by a pure function, so the ordering rules that keep the sender and the
//! receiver off each other's bytes are unit-tested without sockets.

use std::ops::Range;

/// How received bytes are combined into the buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Combine {
    /// Overwrite the destination (all-gather, broadcast).
    Copy,
    /// `dst += src`, element-wise.
    Sum(Elem),
    /// `dst = (dst + src) / divisor`: the last reduce step of an average, so the division costs no
    /// extra pass over memory.
    SumDivided(Elem, f64),
}

/// Element types the ring can reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F64,
}

impl Elem {
    pub(crate) fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
        }
    }
}

/// One send: `bytes` of the buffer, once the receiver has finished `after_recvs` receives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SendStep {
    pub bytes: Range<usize>,
    pub after_recvs: usize,
}

/// One receive into `bytes` of the buffer, once the sender has finished `after_sends` sends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RecvStep {
    pub bytes: Range<usize>,
    pub after_sends: usize,
    pub combine: Combine,
}

/// How the ranks make sure they agree on an operation before its data moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Agreement {
    /// Each rank sends its header ahead of its data and checks its predecessor's. Enough where
    /// every rank's result depends on every link (all-reduce, all-gather, barrier): any mismatch
    /// is seen by at least two ranks (a ring that changes value somewhere changes it twice), and
    /// a refusing rank, which closes its links and sends no more, leaves every rank short of data.
    #[default]
    Neighbours,
    /// The header goes once round the ring before any data (broadcast: the root receives nothing
    /// and would otherwise return `Ok` while its peers refuse). `starts` on the root.
    Lap { starts: bool },
}

/// The transfers one rank performs for one collective, in order on each link.
#[derive(Debug, Clone, Default)]
pub(crate) struct Schedule {
    pub sends: Vec<SendStep>,
    pub recvs: Vec<RecvStep>,
    pub agreement: Agreement,
}

impl Schedule {
    /// Bytes this rank puts on the wire; small operations run on one thread.
    pub(crate) fn sent_bytes(&self) -> usize {
        self.sends.iter().map(|s| s.bytes.len()).sum()
    }
}

/// Ring all-reduce of `len` elements: reduce-scatter (`n - 1` steps) then all-gather (`n - 1`).
///
/// At global step `t` rank `r` sends chunk `(r - t) mod n` and receives chunk `(r - t - 1) mod n`;
/// after step `n - 2` it holds chunk `r + 1` fully reduced. `divisor` is applied on the last reduce
/// step (`Some(n)` for an average).
pub(crate) fn all_reduce(
    rank: usize,
    world: usize,
    len: usize,
    elem: Elem,
    segment_bytes: usize,
    divisor: Option<f64>,
) -> Schedule {
    let chunks: Vec<Range<usize>> = (0..world).map(|c| (c * len / world)..((c + 1) * len / world)).collect();
    let reduce_steps = world.saturating_sub(1);
    let combine = |t: usize| match divisor {
        Some(d) if t + 1 == reduce_steps => Combine::SumDivided(elem, d),
        _ => Combine::Sum(elem),
    };
    ring(rank, world, &chunks, elem.size(), segment_bytes, reduce_steps, combine)
}

/// Ring all-gather: slot `r` of the `world * slot_bytes` buffer is rank `r`'s input.
pub(crate) fn all_gather(rank: usize, world: usize, slot_bytes: usize, segment_bytes: usize) -> Schedule {
    let slots: Vec<Range<usize>> = (0..world).map(|c| (c * slot_bytes)..((c + 1) * slot_bytes)).collect();
    ring(rank, world, &slots, 1, segment_bytes, 0, |_| Combine::Copy)
}

/// Pipelined chain broadcast from `root` around the ring; the rank before `root` only receives.
pub(crate) fn broadcast(rank: usize, world: usize, root: usize, len_bytes: usize, segment_bytes: usize) -> Schedule {
    let mut schedule = Schedule::default();
    if world < 2 {
        return schedule;
    }
    let position = (rank + world - root) % world;
    schedule.agreement = Agreement::Lap { starts: position == 0 };
    let segments = segment_ranges(0..len_bytes, segment_bytes.max(1));
    if position != world - 1 {
        schedule.sends = segments
            .iter()
            .enumerate()
            .map(|(j, bytes)| SendStep {
                bytes: bytes.clone(),
                // A forwarding rank sends segment j only after it has received it.
                after_recvs: if position == 0 { 0 } else { j + 1 },
            })
            .collect();
    }
    if position != 0 {
        schedule.recvs =
            segments.into_iter().map(|bytes| RecvStep { bytes, after_sends: 0, combine: Combine::Copy }).collect();
    }
    schedule
}

/// The generic ring: `steps = reduce_steps + (n - 1)` steps over `chunks` (element ranges), each
/// chunk cut into the same number `S` of segments (shorter chunks get empty trailing segments, so
/// unit `u = t * S + j` means the same thing on every rank).
///
/// Ordering invariants, which make the concurrent sender and receiver touch disjoint bytes:
/// - send `u` needs receive `u - S` done: step `t` forwards what step `t - 1` received;
/// - receive `u` needs send `u - (n - 1) * S` done: it overwrites the chunk sent `n - 1` steps
///   earlier. With both rules the two threads are never on the same segment of the same chunk.
fn ring(
    rank: usize,
    world: usize,
    chunks: &[Range<usize>],
    elem_size: usize,
    segment_bytes: usize,
    reduce_steps: usize,
    combine: impl Fn(usize) -> Combine,
) -> Schedule {
    let mut schedule = Schedule::default();
    if world < 2 {
        return schedule;
    }
    let segment_elems = (segment_bytes / elem_size).max(1);
    let per_chunk = chunks.iter().map(|c| c.len().div_ceil(segment_elems)).max().unwrap_or(0).max(1);
    let steps = reduce_steps + world - 1;
    let segment = |chunk: usize, j: usize| {
        let c = &chunks[chunk];
        let start = (c.start + j * segment_elems).min(c.end);
        let end = (start + segment_elems).min(c.end);
        (start * elem_size)..(end * elem_size)
    };
    for t in 0..steps {
        let send_chunk = (rank + world - t % world) % world;
        let recv_chunk = (rank + world - (t + 1) % world) % world;
        let mode = if t < reduce_steps { combine(t) } else { Combine::Copy };
        for j in 0..per_chunk {
            let u = t * per_chunk + j;
            schedule
                .sends
                .push(SendStep { bytes: segment(send_chunk, j), after_recvs: (u + 1).saturating_sub(per_chunk) });
            schedule.recvs.push(RecvStep {
                bytes: segment(recv_chunk, j),
                after_sends: (u + 1).saturating_sub((world - 1) * per_chunk),
                combine: mode,
            });
        }
    }
    schedule
}

fn segment_ranges(range: Range<usize>, segment: usize) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(range.len().div_ceil(segment));
    let mut start = range.start;
    while start < range.end {
        let end = (start + segment).min(range.end);
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
        a.start < b.end && b.start < a.end
    }

    /// Simulates the ring with every rank's buffer holding, per element, the set of ranks whose
    /// contribution it contains, and checks every rank ends with all contributions everywhere.
    fn simulate_all_reduce(world: usize, len: usize, segment_bytes: usize) {
        let schedules: Vec<Schedule> =
            (0..world).map(|r| all_reduce(r, world, len, Elem::F32, segment_bytes, None)).collect();
        let mut held: Vec<Vec<u64>> = (0..world).map(|r| vec![1u64 << r; len]).collect();
        let steps = schedules[0].sends.len();
        for u in 0..steps {
            let sent: Vec<Vec<u64>> = (0..world)
                .map(|r| {
                    let b = &schedules[r].sends[u].bytes;
                    held[r][b.start / 4..b.end / 4].to_vec()
                })
                .collect();
            for r in 0..world {
                let from = (r + world - 1) % world;
                let recv = &schedules[r].recvs[u];
                assert_eq!(recv.bytes.len(), sent[from].len() * 4, "message sizes must match");
                let dst = &mut held[r][recv.bytes.start / 4..recv.bytes.end / 4];
                for (d, s) in dst.iter_mut().zip(&sent[from]) {
                    match recv.combine {
                        Combine::Copy => *d = *s,
                        _ => {
                            assert_eq!(*d & *s, 0, "a contribution was added twice");
                            *d |= *s;
                        }
                    }
                }
            }
        }
        let all = (1u64 << world) - 1;
        for (r, h) in held.iter().enumerate() {
            assert!(h.iter().all(|&x| x == all), "rank {r} of {world} (len {len}) is incomplete");
        }
    }

    #[test]
    fn all_reduce_schedule_delivers_every_contribution() {
        for world in 2..=5 {
            for len in [0, 1, 3, 7, 64, 1001] {
                for segment in [4, 12, 64, 1 << 20] {
                    simulate_all_reduce(world, len, segment);
                }
            }
        }
    }

    #[test]
    fn concurrent_steps_never_touch_the_same_bytes() {
        // Any send and receive the dependency rules allow to run at the same time must be disjoint.
        for world in 2..=5 {
            let s = all_reduce(1, world, 103, Elem::F32, 16, Some(2.0));
            for (i, send) in s.sends.iter().enumerate() {
                for (k, recv) in s.recvs.iter().enumerate() {
                    // Sender on send i (i sends done) and receiver on receive k (k done).
                    let send_may_run = send.after_recvs <= k;
                    let recv_may_run = recv.after_sends <= i;
                    if send_may_run && recv_may_run {
                        assert!(!overlaps(&send.bytes, &recv.bytes), "world {world}: send {i} vs recv {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn average_divides_only_on_the_last_reduce_step() {
        let s = all_reduce(0, 3, 30, Elem::F64, 1 << 20, Some(3.0));
        let combines: Vec<Combine> = s.recvs.iter().map(|r| r.combine).collect();
        assert_eq!(
            combines,
            vec![Combine::Sum(Elem::F64), Combine::SumDivided(Elem::F64, 3.0), Combine::Copy, Combine::Copy]
        );
    }

    #[test]
    fn broadcast_chain_forwards_after_receiving() {
        let single = broadcast(0, 1, 0, 10, 4);
        assert!(single.sends.is_empty() && single.recvs.is_empty(), "world 1 moves nothing");
        let first = broadcast(2, 3, 2, 10, 4);
        assert_eq!(first.agreement, Agreement::Lap { starts: true });
        assert_eq!(broadcast(0, 3, 2, 0, 4).agreement, Agreement::Lap { starts: false }, "even with no data");
        assert_eq!(first.sends.len(), 3);
        assert!(first.recvs.is_empty());
        let middle = broadcast(0, 3, 2, 10, 4);
        assert_eq!(middle.sends.iter().map(|s| s.after_recvs).collect::<Vec<_>>(), vec![1, 2, 3]);
        let last = broadcast(1, 3, 2, 10, 4);
        assert!(last.sends.is_empty());
        assert_eq!(last.recvs.len(), 3);
    }
}
