//! Which checkpoints to delete: a pure function, so every case is unit-tested without files.

use std::collections::BTreeSet;

/// Whether a lower or a higher metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricOrder {
    Min,
    Max,
}

/// Steps to delete from `checkpoints` (step, metric), keeping the newest `keep_last` (at least
/// the newest one, always) and the `keep_best` best by metric (ties go to the newer step;
/// checkpoints without a metric never count as best).
pub fn to_delete(
    checkpoints: &[(u64, Option<f64>)],
    keep_last: usize,
    keep_best: usize,
    order: MetricOrder,
) -> Vec<u64> {
    let mut by_step: Vec<(u64, Option<f64>)> = checkpoints.to_vec();
    by_step.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut keep: BTreeSet<u64> = by_step.iter().take(keep_last.max(1)).map(|(s, _)| *s).collect();

    let mut ranked: Vec<(u64, f64)> =
        by_step.iter().filter_map(|(s, m)| m.filter(|m| m.is_finite()).map(|m| (*s, m))).collect();
    // Newest first already; a stable sort keeps newer steps ahead among equal metrics.
    ranked.sort_by(|a, b| match order {
        MetricOrder::Min => a.1.total_cmp(&b.1),
        MetricOrder::Max => b.1.total_cmp(&a.1),
    });
    keep.extend(ranked.iter().take(keep_best).map(|(s, _)| *s));

    let mut delete: Vec<u64> = by_step.iter().map(|(s, _)| *s).filter(|s| !keep.contains(s)).collect();
    delete.sort_unstable();
    delete
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_k() {
        let c = [(10, None), (20, None), (30, None), (40, None)];
        assert_eq!(to_delete(&c, 2, 0, MetricOrder::Min), vec![10, 20]);
        assert_eq!(to_delete(&c, 10, 0, MetricOrder::Min), Vec::<u64>::new());
    }

    #[test]
    fn the_newest_is_never_deleted() {
        let c = [(10, Some(1.0)), (20, Some(5.0))];
        assert_eq!(to_delete(&c, 0, 1, MetricOrder::Min), Vec::<u64>::new());
        assert_eq!(to_delete(&c, 0, 0, MetricOrder::Min), vec![10]);
    }

    #[test]
    fn keeps_the_best_by_metric_and_order() {
        let c = [(10, Some(3.0)), (20, Some(1.0)), (30, Some(2.0)), (40, Some(4.0)), (50, Some(5.0))];
        assert_eq!(to_delete(&c, 1, 2, MetricOrder::Min), vec![10, 40]);
        assert_eq!(to_delete(&c, 1, 2, MetricOrder::Max), vec![10, 20, 30]);
    }

    #[test]
    fn ties_favour_the_newer_step_and_missing_metrics_never_rank() {
        let c = [(10, Some(1.0)), (20, Some(1.0)), (30, None), (40, Some(f64::NAN)), (50, None)];
        assert_eq!(to_delete(&c, 1, 1, MetricOrder::Min), vec![10, 30, 40]);
    }
}
