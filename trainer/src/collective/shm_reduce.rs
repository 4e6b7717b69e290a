//! The arithmetic of the `shm` backend: which part of a range each rank sums, and the blocked
//! summation over raw pointers into shared memory.

use std::ops::Range;
use std::ptr;

use tch::Kind;

use super::ReduceOp;

/// Elements summed per block: the block's running sum stays in L1.
const BLOCK: usize = 2048;

/// f32 and f64, the element types the backend sums.
pub(super) trait Element: Copy + std::ops::AddAssign + std::ops::Div<Output = Self> + Default {
    const KIND: Kind;
    fn from_usize(n: usize) -> Self;
}

impl Element for f32 {
    const KIND: Kind = Kind::Float;
    fn from_usize(n: usize) -> Self {
        n as f32
    }
}

impl Element for f64 {
    const KIND: Kind = Kind::Double;
    fn from_usize(n: usize) -> Self {
        n as f64
    }
}

pub(super) fn divisor<T: Element>(op: ReduceOp, world: usize) -> Option<T> {
    match op {
        ReduceOp::Sum => None,
        ReduceOp::Avg => Some(T::from_usize(world)),
    }
}

/// `outputs[j][i] = (inputs[0][i] + inputs[1][i] + ...) / divisor` for `i < len`, in blocks,
/// summing in input order (so every rank that sums the same inputs gets the same bits). An
/// output may be one of the inputs: each block is read completely before it is written. The
/// memory is only touched through raw pointers: it may be shared with other processes, which
/// the caller's protocol keeps off these elements for the duration of the call.
///
/// # Safety
/// Every pointer must be valid and aligned for `len` elements, and no other thread or process may
/// access them meanwhile (except reading inputs that are not outputs).
pub(super) unsafe fn reduce_blocks<T: Element>(
    inputs: &[*const T],
    outputs: &[*mut T],
    len: usize,
    divisor: Option<T>,
) {
    let mut sum = [T::default(); BLOCK];
    let mut start = 0;
    while start < len {
        let n = BLOCK.min(len - start);
        let acc = &mut sum[..n];
        // SAFETY (all blocks below): within the caller's `len` elements of each pointer; `sum` is
        // a local array, distinct from all of them.
        unsafe { ptr::copy_nonoverlapping(inputs[0].add(start), acc.as_mut_ptr(), n) };
        for input in &inputs[1..] {
            let x = unsafe { input.add(start) };
            for (i, a) in acc.iter_mut().enumerate() {
                *a += unsafe { x.add(i).read() };
            }
        }
        if let Some(d) = divisor {
            for a in acc.iter_mut() {
                *a = *a / d;
            }
        }
        for out in outputs {
            unsafe { ptr::copy_nonoverlapping(acc.as_ptr(), out.add(start), n) };
        }
        start += n;
    }
}

/// `len` elements split into `world` contiguous parts, as even as possible; part `r` is rank r's.
pub(super) fn parts(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world).map(|r| (len * r / world)..(len * (r + 1) / world)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_range_in_order() {
        for (len, world) in [(10, 3), (0, 2), (1, 4), (1 << 20, 2), (7, 7)] {
            let p = parts(len, world);
            assert_eq!(p.len(), world);
            assert_eq!(p[0].start, 0);
            assert_eq!(p[world - 1].end, len);
            for w in p.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
        }
    }

    #[test]
    fn blocks_sum_in_rank_order_and_divide() {
        let a: Vec<f32> = (0..5000).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..5000).map(|i| 0.5 * i as f32).collect();
        let mut out = a.clone();
        let outputs = [out.as_mut_ptr()];
        // SAFETY: every pointer covers 5000 elements.
        unsafe { reduce_blocks(&[a.as_ptr(), b.as_ptr()], &outputs, 5000, Some(2.0f32)) };
        for i in 0..5000 {
            assert_eq!(out[i], (a[i] + b[i]) / 2.0);
        }
    }
}
