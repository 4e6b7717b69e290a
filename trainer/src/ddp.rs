//! Data-parallel gradient synchronisation: every rank starts from rank 0's parameters, and the
//! flat gradient buffer is averaged across ranks bucket by bucket, while backward still runs
//! where the step allows it.
//!
//! Buckets are slices of the flat gradient buffer (so each is all-reduced in place), cut along
//! its layout, which follows the reverse of the order the model created its variables: roughly
//! the order backward finishes them (see [`FlatParams`]). They are all-reduced in one fixed
//! order, the same on every rank, the order backward is expected to complete them in. During the
//! last backward of a step ([`Ddp::sync_grads_during`]) a hook on every variable counts the
//! gradients each bucket still waits for (variables the graph below the loss does not reach count
//! as done from the start); as soon as the next bucket in that order is complete, a second thread
//! all-reduces it while backward goes on. What is still waiting when backward returns follows
//! then.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use tch::Tensor;
use tch::nn::VarStore;

use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::optim::flat::creation_order;
use crate::optim::{FlatEntry, FlatParams};

/// One rank's side of DDP: owns the flat parameter and gradient buffers.
pub struct Ddp {
    params: FlatParams,
    /// Slices of the flat gradient buffer in the order they are all-reduced.
    buckets: Vec<Range<i64>>,
    /// Shared with the variables' hooks, which hold a raw pointer to it until `Drop` removes them.
    readiness: Arc<Readiness>,
    /// Buckets of the last [`Ddp::sync_grads_during`] that were handed to the all-reduce thread
    /// before backward returned.
    overlapped: usize,
}

impl Ddp {
    /// Flattens `vs` in rank 0's creation order and broadcasts rank 0's parameters, so all ranks
    /// start identical (sync point). The gradient buffer is the collective's shared memory where
    /// it has some (no staging copies). Gradients are all-reduced in buckets of at most
    /// `bucket_bytes` (see [`bucket_size`]).
    pub fn new(vs: &VarStore, collective: &mut dyn Collective, bucket_bytes: usize) -> Result<Self, CollectiveError> {
        let order = agree_on_creation_order(vs, collective)?;
        let mut params = FlatParams::with_creation_order(vs, &order);
        if let Some(shared) = collective.shared_zeros(params.grads().numel() as i64, params.grads().kind())? {
            params.set_grad_buffer(shared);
        }
        if collective.world_size() > 1 {
            let mut flat = params.params().shallow_clone();
            tch::no_grad(|| collective.broadcast(&mut flat, 0))?;
        }
        let elem = params.params().kind().elt_size_in_bytes() as i64;
        let bucket_elems = bucket_size(bucket_bytes as i64, params.numel() * elem) / elem;
        let (buckets, bucket_of) = plan_buckets(params.entries(), params.decay_numel(), bucket_elems);
        let readiness = Arc::new(Readiness::new(bucket_of, buckets.len()));
        let mut ddp = Self { params, buckets, readiness, overlapped: 0 };
        if collective.world_size() > 1 {
            let context = Arc::as_ptr(&ddp.readiness).cast();
            // SAFETY: `context` points into the `Arc` that `ddp` owns; `Drop` removes the hooks
            // before releasing it, and `grad_ready` only locks a mutex, so any thread may call it.
            unsafe { ddp.params.set_ready_hooks(Some(grad_ready), context) }
                .map_err(|reason| CollectiveError::Unsupported { op: "ddp", reason })?;
        }
        Ok(ddp)
    }

    pub fn params(&self) -> &FlatParams {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut FlatParams {
        &mut self.params
    }

    /// The slices of the flat gradient buffer, in the order they are all-reduced.
    pub fn buckets(&self) -> &[Range<i64>] {
        &self.buckets
    }

    /// How many buckets the last [`Ddp::sync_grads_during`] started to all-reduce before its
    /// backward returned (the rest followed it).
    pub fn overlapped_buckets(&self) -> usize {
        self.overlapped
    }

    /// Averages the accumulated gradients (already in the flat buffer, see
    /// [`FlatParams::gather_grads`]) across ranks (sync point: every rank must call this, or
    /// [`Ddp::sync_grads_during`], once in the same step).
    pub fn sync_grads(&mut self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        self.params.gather_grads();
        if collective.world_size() == 1 {
            return Ok(());
        }
        let grads = self.params.grads().shallow_clone();
        for range in &self.buckets {
            all_reduce_bucket(collective, &grads, range)?;
        }
        Ok(())
    }

    /// Runs `backward` from `root` (the step's last: it must leave the step's gradients complete)
    /// while averaging the gradients across ranks, each bucket as soon as backward has finished
    /// it, on a second thread; variables the graph below `root` does not reach count as finished
    /// from the start. Returns what `backward` returned and whether the gradients were synced.
    /// A sync point like [`Ddp::sync_grads`], with the same all-reduces in the same order, so
    /// ranks may use either in a step.
    pub fn sync_grads_during<T>(
        &mut self,
        collective: &mut dyn Collective,
        root: &Tensor,
        backward: impl FnOnce() -> T,
    ) -> (T, Result<(), CollectiveError>) {
        // `.grad` tensors code replaced become views again, so backward adds into the buffer.
        self.params.gather_grads();
        if collective.world_size() == 1 {
            self.overlapped = 0;
            return (backward(), Ok(()));
        }
        // Without the graph's answer every variable is waited for: slower, still right.
        let reached = self.params.reached_by_backward(root).unwrap_or_else(|e| {
            tracing::warn!("cannot tell which variables backward reaches ({e}); the all-reduce waits for all");
            vec![true; self.params.entries().len()]
        });
        let grads = self.params.grads().shallow_clone();
        let buckets = &self.buckets;
        let (out, overlapped, late, synced) = std::thread::scope(|scope| {
            let (launch, launched) = mpsc::channel::<usize>();
            let comm = scope.spawn(move || -> Result<(), CollectiveError> {
                for bucket in launched {
                    all_reduce_bucket(collective, &grads, &buckets[bucket])?;
                }
                Ok(())
            });
            // Disarms on the way out even if `backward` panics, so the thread above ends.
            let armed = Armed::new(&self.readiness, launch, &reached);
            let out = backward();
            let (overlapped, late) = armed.launch_the_rest();
            let synced = comm.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (out, overlapped, late, synced)
        });
        self.overlapped = overlapped;
        let synced = synced.and_then(|()| match late {
            None => Ok(()),
            Some(entry) => Err(CollectiveError::Unsupported {
                op: "all_reduce",
                reason: format!(
                    "the gradient of {} grew after its bucket was all-reduced (a second backward through it \
                     in the step's last pass, which must be one backward); the ranks' gradients may now differ",
                    self.params.entries()[entry].name
                ),
            }),
        });
        (out, synced)
    }
}

impl Drop for Ddp {
    fn drop(&mut self) {
        let context = Arc::as_ptr(&self.readiness).cast();
        // SAFETY: removes only the hooks this Ddp set (a later Ddp on the same variables keeps its).
        if let Err(e) = unsafe { self.params.set_ready_hooks(None, context) } {
            tracing::warn!("removing the gradient hooks: {e}");
        }
    }
}

/// Every rank takes rank 0's creation order of the variables (sync point): a model built by
/// walking a map may create them in a different order on each rank, and the flat layouts must
/// match element for element. Ranks first compare their variables' names and shapes, so ranks that
/// built different models all stop here with the same message.
fn agree_on_creation_order(
    vs: &VarStore,
    collective: &mut dyn Collective,
) -> Result<BTreeMap<String, usize>, CollectiveError> {
    let mut order = creation_order(vs);
    if collective.world_size() == 1 {
        return Ok(order);
    }
    let variables = vs.variables();
    let mut hasher = std::hash::DefaultHasher::new();
    for name in order.keys() {
        (name, variables[name].size()).hash(&mut hasher);
    }
    let mine = Tensor::from_slice(&[order.len() as i64, hasher.finish() as i64]);
    let all = collective.all_gather(&mine)?;
    let read = |t: &Tensor| Vec::<i64>::try_from(t).unwrap_or_default();
    let rank0 = read(&all[0]);
    if let Some(rank) = all.iter().position(|t| read(t) != rank0) {
        return Err(CollectiveError::Unsupported {
            op: "ddp",
            reason: format!(
                "rank {rank} built another model than rank 0 ({} trainable variables against {}, or other names \
                 or shapes); every rank must build the same model",
                read(&all[rank]).first().copied().unwrap_or(-1),
                rank0.first().copied().unwrap_or(-1)
            ),
        });
    }
    // By name, the same on every rank.
    let mut positions = Tensor::from_slice(&order.values().map(|&p| p as i64).collect::<Vec<_>>());
    collective.broadcast(&mut positions, 0)?;
    let positions = Vec::<i64>::try_from(&positions).map_err(|e| CollectiveError::Unsupported {
        op: "broadcast",
        reason: format!("reading rank 0's variable order: {e}"),
    })?;
    for (slot, position) in order.values_mut().zip(positions) {
        *slot = position as usize;
    }
    Ok(order)
}

/// The bytes of a bucket: at most `cap`, and at most a sixteenth of the model's `total` gradient
/// bytes, though not under 1 MiB: a model smaller than a few buckets of `cap` would otherwise be
/// one bucket, all-reduced only once backward is over.
pub fn bucket_size(cap: i64, total: i64) -> i64 {
    cap.min((total / 16).max(1 << 20)).max(1)
}

/// Cuts the layout into buckets of about `bucket_elems` elements (a larger variable is a bucket
/// of its own), never across the end of the decay group, and orders them by when backward is
/// expected to complete them: a bucket is complete when its earliest-created variable is, and
/// backward finishes the latest-created first. Returns the ranges in that order and, for each
/// entry, the position of its bucket.
fn plan_buckets(entries: &[FlatEntry], decay_numel: i64, bucket_elems: i64) -> (Vec<Range<i64>>, Vec<usize>) {
    // (range, entries, earliest creation) in layout order.
    let mut cut: Vec<(Range<i64>, Vec<usize>, usize)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let end = entry.offset + entry.numel();
        let fits = cut.last().is_some_and(|(range, _, _)| {
            range.end - range.start < bucket_elems.max(1) && (range.start < decay_numel) == (entry.offset < decay_numel)
        });
        match cut.last_mut() {
            Some((range, members, earliest)) if fits => {
                range.end = end;
                members.push(i);
                *earliest = (*earliest).min(entry.created);
            }
            _ => cut.push((entry.offset..end, vec![i], entry.created)),
        }
    }
    cut.sort_by_key(|(range, _, earliest)| (std::cmp::Reverse(*earliest), range.start));
    let mut bucket_of = vec![0; entries.len()];
    for (position, (_, members, _)) in cut.iter().enumerate() {
        for &i in members {
            bucket_of[i] = position;
        }
    }
    (cut.into_iter().map(|(range, _, _)| range).collect(), bucket_of)
}

fn all_reduce_bucket(
    collective: &mut dyn Collective,
    grads: &Tensor,
    range: &Range<i64>,
) -> Result<(), CollectiveError> {
    // A 1-D slice of a contiguous buffer is contiguous: the backend reduces it in place.
    let mut bucket = grads.narrow(0, range.start, range.end - range.start);
    collective.all_reduce(&mut bucket, ReduceOp::Avg)
}

/// Which buckets backward has completed during an overlapped sync, fed by the variables' hooks.
struct Readiness {
    state: Mutex<ReadyState>,
}

struct ReadyState {
    /// Each entry's bucket (its position in the all-reduce order).
    bucket_of: Vec<usize>,
    /// Entries per bucket.
    sizes: Vec<usize>,
    /// Where complete buckets go, in order; `None` outside an overlapped sync.
    launch: Option<Sender<usize>>,
    /// Entries whose gradient backward has accumulated.
    seen: Vec<bool>,
    /// Per bucket, entries still to come.
    waiting: Vec<usize>,
    /// The next bucket to launch.
    next: usize,
    /// An entry whose gradient came again after its bucket was launched (its all-reduce may
    /// have missed it).
    late: Option<usize>,
}

impl Readiness {
    fn new(bucket_of: Vec<usize>, buckets: usize) -> Self {
        let mut sizes = vec![0; buckets];
        for &b in &bucket_of {
            sizes[b] += 1;
        }
        let entries = bucket_of.len();
        let state = ReadyState {
            bucket_of,
            sizes,
            launch: None,
            seen: vec![false; entries],
            waiting: vec![0; buckets],
            next: 0,
            late: None,
        };
        Self { state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, ReadyState> {
        // A panic while holding the lock leaves the counts usable; nothing is half-written.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ReadyState {
    /// Backward has accumulated `entry`'s gradient: launch every bucket that is now next in line
    /// and complete.
    fn ready(&mut self, entry: usize) {
        if self.launch.is_none() || entry >= self.seen.len() {
            return;
        }
        if self.seen[entry] {
            if self.bucket_of[entry] < self.next {
                self.late.get_or_insert(entry);
            }
            return;
        }
        self.seen[entry] = true;
        self.waiting[self.bucket_of[entry]] -= 1;
        while self.next < self.waiting.len() && self.waiting[self.next] == 0 {
            self.send(self.next);
            self.next += 1;
        }
    }

    fn send(&self, bucket: usize) {
        if let Some(launch) = &self.launch {
            // The receiver is gone only when an all-reduce failed; that error is reported.
            let _ = launch.send(bucket);
        }
    }
}

/// An overlapped sync in progress: the hooks launch buckets until it ends.
struct Armed<'a> {
    readiness: &'a Readiness,
}

impl<'a> Armed<'a> {
    /// Starts listening; entries not `reached` by backward are finished already.
    fn new(readiness: &'a Readiness, launch: Sender<usize>, reached: &[bool]) -> Self {
        let mut guard = readiness.lock();
        let state = &mut *guard;
        state.seen.fill(false);
        state.waiting.clone_from(&state.sizes);
        state.next = 0;
        state.late = None;
        state.launch = Some(launch);
        for (entry, _) in reached.iter().enumerate().filter(|(_, reached)| !**reached) {
            state.ready(entry);
        }
        drop(guard);
        Self { readiness }
    }

    /// Backward has returned: launches the buckets not launched yet, in order, and stops
    /// listening. Returns how many were launched before, and the first entry whose gradient came
    /// after its bucket had been launched, if any.
    fn launch_the_rest(self) -> (usize, Option<usize>) {
        let mut state = self.readiness.lock();
        let early = state.next;
        for bucket in early..state.waiting.len() {
            state.send(bucket);
        }
        state.next = state.waiting.len();
        (early, state.late)
        // `Drop` closes the channel.
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.readiness.lock().launch = None;
    }
}

/// The variables' hook: backward has accumulated entry `index`'s gradient.
///
/// # Safety
/// `context` is the `Readiness` of a live [`Ddp`] (it removes its hooks before freeing it).
unsafe extern "C" fn grad_ready(context: *const std::ffi::c_void, index: i64) {
    // SAFETY: as the function's contract says.
    let readiness = unsafe { &*context.cast::<Readiness>() };
    readiness.lock().ready(index as usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, offset: i64, numel: i64, created: usize) -> FlatEntry {
        FlatEntry { name: name.into(), offset, shape: vec![numel], created }
    }

    #[test]
    fn small_models_get_buckets_of_a_sixteenth_but_not_under_a_mebibyte() {
        const MIB: i64 = 1 << 20;
        assert_eq!(bucket_size(25 * MIB, 500 * MIB), 25 * MIB);
        assert_eq!(bucket_size(25 * MIB, 64 * MIB), 4 * MIB);
        assert_eq!(bucket_size(25 * MIB, 12 * MIB), MIB);
        assert_eq!(bucket_size(4096, 12 * MIB), 4096);
        assert_eq!(bucket_size(0, MIB), 1);
    }

    #[test]
    fn buckets_follow_the_layout_and_go_in_the_order_backward_completes_them() {
        // Layout: decay group (d2 d1 d0, latest created first), then the rest (b2 b1).
        let entries = [
            entry("d2", 0, 4, 5),
            entry("d1", 4, 4, 3),
            entry("d0", 8, 8, 0),
            entry("b2", 16, 2, 4),
            entry("b1", 18, 2, 2),
        ];
        let (buckets, bucket_of) = plan_buckets(&entries, 16, 6);
        // d2+d1 fill a bucket; d0 is one of its own; the decay group's end cuts b2+b1 off.
        // Ready order: d2+d1 when d1 (created 3) is done, b2+b1 at 2, d0 last (0).
        assert_eq!(buckets, [0..8, 16..20, 8..16]);
        assert_eq!(bucket_of, [0, 0, 2, 1, 1]);
    }
}
