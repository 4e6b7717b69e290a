//! The learning-rate schedule: linear warm-up, then cosine decay to a floor.

/// Linear warm-up then cosine decay, as a pure function of the optimizer step (counted from 0,
/// the step about to be taken), so a resumed run needs only the step counter.
///
/// With `w = warmup_steps`, `n = total_steps`:
///
/// * `step < w`: `base_lr * (step + 1) / w`, rising from `base_lr / w` to `base_lr` at step w - 1;
/// * `w <= step < n`: `min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - w) / (n - w))) / 2`,
///   so `base_lr` at step w, falling towards `min_lr`;
/// * `step >= max(w, n)`: `min_lr` (including `n <= w`, where there is no decay phase).
///
/// `warmup_steps = 0` starts at `base_lr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warm-up.
    pub base_lr: f64,
    /// Floor reached at `total_steps` and kept afterwards.
    pub min_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Step at which the cosine decay reaches `min_lr`.
    pub total_steps: u64,
}

impl LrSchedule {
    /// A constant learning rate (no warm-up, no decay).
    pub fn constant(lr: f64) -> Self {
        Self { base_lr: lr, min_lr: lr, warmup_steps: 0, total_steps: 0 }
    }

    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let progress = (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.base_lr - self.min_lr) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn warmup_rises_linearly_to_base() {
        let s = LrSchedule { base_lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, total_steps: 100 };
        assert!(close(s.lr_at(0), 1e-4));
        assert!(close(s.lr_at(4), 5e-4));
        assert!(close(s.lr_at(9), 1e-3));
        assert!(close(s.lr_at(10), 1e-3));
    }

    #[test]
    fn cosine_decays_to_min_at_total_and_stays() {
        let s = LrSchedule { base_lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, total_steps: 110 };
        assert!(close(s.lr_at(60), 5.5e-4)); // halfway: cos(pi/2) = 0
        assert!(s.lr_at(109) > 1e-4 && s.lr_at(109) < 1.003e-4); // 1e-4 + 9e-4 * (1 + cos(0.99 pi)) / 2
        assert!(close(s.lr_at(110), 1e-4));
        assert!(close(s.lr_at(10_000), 1e-4));
        let mut prev = f64::INFINITY;
        for step in 10..=110 {
            let lr = s.lr_at(step);
            assert!(lr <= prev, "not monotone at step {step}");
            prev = lr;
        }
    }

    #[test]
    fn zero_warmup_starts_at_base() {
        let s = LrSchedule { base_lr: 2.0, min_lr: 0.0, warmup_steps: 0, total_steps: 4 };
        assert!(close(s.lr_at(0), 2.0));
        assert!(close(s.lr_at(2), 1.0));
        assert!(close(s.lr_at(4), 0.0));
    }

    #[test]
    fn total_equal_to_warmup_has_no_decay_phase() {
        let s = LrSchedule { base_lr: 1.0, min_lr: 0.1, warmup_steps: 5, total_steps: 5 };
        assert!(close(s.lr_at(4), 1.0));
        assert!(close(s.lr_at(5), 0.1));
        let s = LrSchedule { total_steps: 3, ..s };
        assert!(close(s.lr_at(4), 1.0), "warm-up still completes when total < warmup");
        assert!(close(s.lr_at(5), 0.1));
    }

    #[test]
    fn constant_schedule_never_changes() {
        let s = LrSchedule::constant(3e-4);
        for step in [0, 1, 100, u64::MAX] {
            assert_eq!(s.lr_at(step), 3e-4);
        }
    }
}
