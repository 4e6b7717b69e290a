//! Examples of a fixed list visited in epochs: each epoch a seeded shuffle of the whole list, so
//! the example at any position of the stream depends on (seed, position) alone, as resumed and
//! resized runs need.

use super::splitmix::SplitMix64;

/// The example order of `n` examples, epoch after epoch; the current epoch's order is cached.
#[derive(Debug, Clone)]
pub struct Epochs {
    n: u64,
    seed: u64,
    /// The epoch whose order `order` holds.
    epoch: Option<u64>,
    order: Vec<u64>,
}

impl Epochs {
    pub fn new(n: usize, seed: u64) -> Self {
        Self { n: n as u64, seed, epoch: None, order: Vec::new() }
    }

    /// The example at `position` of the stream (`step × global batch + sample`).
    pub fn example(&mut self, position: u64) -> usize {
        assert!(self.n > 0, "an epoch of no examples");
        let (epoch, within) = (position / self.n, position % self.n);
        if self.epoch != Some(epoch) {
            self.order = permutation(self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15), self.n);
            self.epoch = Some(epoch);
        }
        self.order[within as usize] as usize
    }
}

/// A seeded permutation of `0..n` (Fisher–Yates).
fn permutation(seed: u64, n: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for k in (1..n as usize).rev() {
        order.swap(k, (rng.next_u64() % (k as u64 + 1)) as usize);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::{Epochs, permutation};

    #[test]
    fn permutations_cover_every_index_once() {
        for seed in [0, 1, 99] {
            let mut seen = permutation(seed, 17);
            seen.sort_unstable();
            assert_eq!(seen, (0..17).collect::<Vec<_>>());
        }
        assert_ne!(permutation(1, 17), (0..17).collect::<Vec<_>>());
        assert_eq!(permutation(1, 17), permutation(1, 17));
    }

    #[test]
    fn every_epoch_visits_each_example_once_in_its_own_order() {
        let mut epochs = Epochs::new(5, 3);
        let first: Vec<usize> = (0..5).map(|p| epochs.example(p)).collect();
        let second: Vec<usize> = (5..10).map(|p| epochs.example(p)).collect();
        for mut e in [first.clone(), second.clone()] {
            e.sort_unstable();
            assert_eq!(e, vec![0, 1, 2, 3, 4]);
        }
        assert_ne!(first, second);
        // Going back to an earlier epoch gives the same order again.
        assert_eq!((0..5).map(|p| epochs.example(p)).collect::<Vec<_>>(), first);
    }
}
