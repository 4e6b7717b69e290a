//! The global-batch plan: which corpus window each sample of each step reads, as a pure function
//! of (seed, step, global sample index). Ranks and micro-steps take sub-ranges of the sample
//! indices, so any split of the global batch — any world size, any accumulation — reads the same
//! windows, and a resumed run needs only the step counter as its data cursor.

use std::ops::Range;

use tch::Tensor;

use super::DataError;
use super::corpus::ByteCorpus;
use super::splitmix::{below, splitmix64};

/// The sampling plan for next-byte prediction on random corpus windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    /// Selects the windows; the same seed gives the same batches.
    pub seed: u64,
    /// Tokens per sample (each sample reads `seq_len + 1` bytes).
    pub seq_len: usize,
    /// Samples per optimizer step, summed over ranks and micro-steps.
    pub global_batch: usize,
}

/// The global samples of micro-batch `m` on `rank` of a gang of `world`: `[(m·W + rank)·micro,
/// +micro)`, cut at the global batch (empty past it). Any (workers, grad_accum) split of the same
/// global batch therefore covers the same samples, which makes resuming with another gang size
/// and gradient accumulation exact.
pub fn rank_samples(m: usize, rank: usize, world: usize, micro: usize, global: usize) -> Range<usize> {
    let start = ((m * world + rank) * micro).min(global);
    start..(start + micro).min(global)
}

impl BatchPlan {
    /// Errors unless `corpus` holds at least one window (`seq_len + 1` bytes).
    pub fn check(&self, corpus: &ByteCorpus) -> Result<(), DataError> {
        corpus.check_len(self.seq_len + 1)
    }

    /// Start of the window for global sample `sample` of step `step`: uniform over the
    /// `corpus_len - seq_len` windows that leave room for the shifted target.
    ///
    /// # Panics
    /// If `corpus_len <= seq_len`; [`BatchPlan::check`] reports that as an error up front.
    pub fn sample_offset(&self, step: u64, sample: usize, corpus_len: usize) -> usize {
        let windows = corpus_len
            .checked_sub(self.seq_len)
            .filter(|&w| w > 0)
            .unwrap_or_else(|| panic!("corpus of {corpus_len} bytes has no window of {} + 1 bytes", self.seq_len));
        let key = splitmix64(splitmix64(splitmix64(self.seed) ^ step) ^ sample as u64);
        below(key, windows as u64) as usize
    }

    /// Inputs and next-byte targets, both i64 `[samples.len(), seq_len]` on the CPU, for the global
    /// sample indices `samples` of step `step`.
    ///
    /// # Panics
    /// If `samples` reaches past `global_batch`, or the corpus is shorter than one window.
    pub fn micro_batch(&self, corpus: &ByteCorpus, step: u64, samples: Range<usize>) -> (Tensor, Tensor) {
        assert!(
            samples.end <= self.global_batch,
            "samples {samples:?} outside the global batch of {}",
            self.global_batch
        );
        let n = samples.len();
        let mut inputs = Vec::with_capacity(n * self.seq_len);
        let mut targets = Vec::with_capacity(n * self.seq_len);
        let bytes = corpus.bytes();
        for sample in samples {
            let start = self.sample_offset(step, sample, bytes.len());
            let window = &bytes[start..start + self.seq_len + 1];
            inputs.extend(window[..self.seq_len].iter().map(|&b| i64::from(b)));
            targets.extend(window[1..].iter().map(|&b| i64::from(b)));
        }
        let shape = [n as i64, self.seq_len as i64];
        (Tensor::from_slice(&inputs).view(shape), Tensor::from_slice(&targets).view(shape))
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_in_range_and_pure() {
        let plan = BatchPlan { seed: 1, seq_len: 8, global_batch: 4 };
        for step in 0..50 {
            for sample in 0..4 {
                let off = plan.sample_offset(step, sample, 20);
                assert!(off + 8 < 20);
                assert_eq!(off, plan.sample_offset(step, sample, 20));
            }
        }
        // Exactly one window: always offset 0.
        assert_eq!(plan.sample_offset(7, 3, 9), 0);
    }

    #[test]
    fn offsets_depend_on_seed_step_and_sample() {
        let a = BatchPlan { seed: 1, seq_len: 8, global_batch: 4 };
        let b = BatchPlan { seed: 2, ..a };
        let len = 1 << 20;
        assert_ne!(a.sample_offset(0, 0, len), b.sample_offset(0, 0, len));
        assert_ne!(a.sample_offset(0, 0, len), a.sample_offset(1, 0, len));
        assert_ne!(a.sample_offset(0, 0, len), a.sample_offset(0, 1, len));
    }

    #[test]
    fn check_rejects_a_corpus_without_a_window() {
        let corpus = ByteCorpus::synthetic(0, 8);
        let plan = BatchPlan { seed: 0, seq_len: 8, global_batch: 1 };
        let err = plan.check(&corpus).expect_err("too short");
        assert!(err.to_string().contains("synthetic(seed=0)"), "{err}");
        assert!(BatchPlan { seq_len: 7, ..plan }.check(&corpus).is_ok());
    }
}
