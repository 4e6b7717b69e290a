//! The loss of a global batch must not depend on how it is split across ranks and micro-batches:
//! each micro-batch's loss, normalised by the *global* counts, is its share, and the shares (and
//! their gradients) sum to the unsplit batch's loss, for every aggregation mode.
#![allow(clippy::unwrap_used)]

use rtrain_rl::{
    KlEstimator, KlPenalty, KlPlacement, LossAggregation, LossNormaliser, PolicyBatch, PolicyLossConfig,
    ValueLossConfig,
};
use tch::{Kind, Tensor};

const B: i64 = 7;
const T: i64 = 6;
/// Two simulated ranks: rank 0 holds rows 0..4 in micro-batches of 1 and 3 rows, rank 1 holds
/// rows 4..7 in micro-batches of 2 and 1 rows.
const RANKS: [&[(i64, i64)]; 2] = [&[(0, 1), (1, 3)], &[(4, 2), (6, 1)]];
const MODES: [LossAggregation; 3] = [
    LossAggregation::TokenMean,
    LossAggregation::SeqMeanTokenMean,
    LossAggregation::SeqMeanTokenSumNorm { length: 16.0 },
];

struct Batch {
    log_probs: Tensor,
    old: Tensor,
    behaviour: Tensor,
    reference: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
}

/// Random inputs with responses of lengths 6, 1, 4, 3, 6, 2, 5 (and a hole in row 2's mask).
fn batch() -> Batch {
    // libtorch's generator is global: tests running side by side must not interleave their draws,
    // or the batch (and the control below) would change from run to run.
    static DRAWING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _drawing = DRAWING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(7);
    let randn = |scale: f64| Tensor::randn([B, T], (Kind::Double, tch::Device::Cpu)) * scale;
    let lengths = Tensor::from_slice(&[6i64, 1, 4, 3, 6, 2, 5]).unsqueeze(-1);
    let mask =
        Tensor::arange(T, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0).lt_tensor(&lengths).to_kind(Kind::Double);
    let _ = mask.get(2).get(1).fill_(0.0);
    let old = randn(0.5) - 1.5;
    let old_values = randn(1.0);
    Batch {
        log_probs: &old + randn(0.3),
        behaviour: &old + randn(0.4),
        reference: &old + randn(0.4),
        advantages: randn(1.0),
        values: &old_values + randn(0.3),
        returns: randn(1.0),
        old_values,
        old,
        mask,
    }
}

fn policy_config(aggregation: LossAggregation) -> PolicyLossConfig {
    PolicyLossConfig {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: Some(1.3),
        tis_cap: Some(1.5),
        kl: Some(KlPenalty { estimator: KlEstimator::K3, coef: 0.1, placement: KlPlacement::Loss }),
        aggregation,
    }
}

/// Policy loss, clip fraction and approx KL for rows `start..start + len`, backpropagated into
/// `leaf` (the log-probs of the whole batch).
fn policy_share(b: &Batch, leaf: &Tensor, mode: LossAggregation, norm: &LossNormaliser, rows: (i64, i64)) -> [f64; 3] {
    let part = |t: &Tensor| t.narrow(0, rows.0, rows.1);
    let log_probs = part(leaf);
    let (old, adv, mask, behaviour, reference) =
        (part(&b.old), part(&b.advantages), part(&b.mask), part(&b.behaviour), part(&b.reference));
    let batch = PolicyBatch {
        log_probs: &log_probs,
        old_log_probs: &old,
        advantages: &adv,
        mask: &mask,
        behaviour_log_probs: Some(&behaviour),
        ref_log_probs: Some(&reference),
    };
    let out = policy_config(mode).compute(&batch, norm).unwrap();
    out.loss.backward();
    [out.loss.double_value(&[]), out.clip_fraction.double_value(&[]), out.approx_kl.double_value(&[])]
}

fn value_share(b: &Batch, leaf: &Tensor, mode: LossAggregation, norm: &LossNormaliser, rows: (i64, i64)) -> [f64; 2] {
    let part = |t: &Tensor| t.narrow(0, rows.0, rows.1);
    let config = ValueLossConfig { clip: Some(0.2), aggregation: mode };
    let out = config.compute(&part(leaf), &part(&b.old_values), &part(&b.returns), &part(&b.mask), norm).unwrap();
    out.loss.backward();
    [out.loss.double_value(&[]), out.clip_fraction.double_value(&[])]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn per_rank_counts_merge_into_the_global_normaliser() {
    let b = batch();
    let global = LossNormaliser::from_mask(&b.mask).unwrap();
    let rank = |rows: (i64, i64)| LossNormaliser::from_mask(&b.mask.narrow(0, rows.0, rows.1)).unwrap();
    assert_eq!(rank((0, 4)).merge(rank((4, 3))), global);
    assert_eq!((global.tokens(), global.sequences()), (26.0, 7.0));
}

#[test]
fn policy_loss_split_over_ranks_and_micro_batches_equals_the_full_batch() {
    let b = batch();
    let norm = LossNormaliser::from_mask(&b.mask).unwrap();
    for mode in MODES {
        let full_leaf = b.log_probs.copy().set_requires_grad(true);
        let full = policy_share(&b, &full_leaf, mode, &norm, (0, B));
        let split_leaf = b.log_probs.copy().set_requires_grad(true);
        let mut summed = [0.0; 3];
        for &(start, len) in RANKS.iter().flat_map(|r| r.iter()) {
            let share = policy_share(&b, &split_leaf, mode, &norm, (start, len));
            summed.iter_mut().zip(share).for_each(|(s, x)| *s += x);
        }
        for (what, (s, f)) in ["loss", "clip fraction", "approx kl"].iter().zip(summed.iter().zip(full)) {
            assert!((s - f).abs() < 1e-12, "{mode:?} {what}: split {s} vs full {f}");
        }
        let diff = max_diff(&split_leaf.grad(), &full_leaf.grad());
        assert!(diff < 1e-12, "{mode:?}: gradients differ by {diff}");
        assert!(full[1] > 0.0, "{mode:?}: the batch should exercise clipping");
    }
}

#[test]
fn value_loss_split_over_ranks_and_micro_batches_equals_the_full_batch() {
    let b = batch();
    let norm = LossNormaliser::from_mask(&b.mask).unwrap();
    for mode in MODES {
        let full_leaf = b.values.copy().set_requires_grad(true);
        let full = value_share(&b, &full_leaf, mode, &norm, (0, B));
        let split_leaf = b.values.copy().set_requires_grad(true);
        let mut summed = [0.0; 2];
        for &(start, len) in RANKS.iter().flat_map(|r| r.iter()) {
            let share = value_share(&b, &split_leaf, mode, &norm, (start, len));
            summed.iter_mut().zip(share).for_each(|(s, x)| *s += x);
        }
        assert!((summed[0] - full[0]).abs() < 1e-12, "{mode:?}: split {} vs full {}", summed[0], full[0]);
        assert!((summed[1] - full[1]).abs() < 1e-12, "{mode:?}: clip fraction");
        let diff = max_diff(&split_leaf.grad(), &full_leaf.grad());
        assert!(diff < 1e-12, "{mode:?}: gradients differ by {diff}");
    }
}

/// The control: normalising each micro-batch by its own counts and averaging the micro-batch
/// losses (the common mistake) does change the loss, so the tests above can tell.
#[test]
fn local_normalisers_would_change_the_loss() {
    let b = batch();
    for mode in MODES {
        let leaf = b.log_probs.copy().set_requires_grad(true);
        let full = policy_share(&b, &leaf, mode, &LossNormaliser::from_mask(&b.mask).unwrap(), (0, B))[0];
        let micro: Vec<(i64, i64)> = RANKS.iter().flat_map(|r| r.iter().copied()).collect();
        let mean_of_local: f64 = micro
            .iter()
            .map(|&rows| {
                let local = LossNormaliser::from_mask(&b.mask.narrow(0, rows.0, rows.1)).unwrap();
                policy_share(&b, &leaf, mode, &local, rows)[0]
            })
            .sum::<f64>()
            / micro.len() as f64;
        assert!((mean_of_local - full).abs() > 1e-3, "{mode:?}: {mean_of_local} vs {full}");
    }
}
