//! On the first update of a batch the policy *is* the old policy: the ratio must be exactly 1,
//! the approx KL exactly 0 and nothing clipped, whatever the options; and the gradient is then
//! the plain policy gradient `-A · w / N` (derivation: d/dlogp of -A·exp(logp - old) at 0).
#![allow(clippy::unwrap_used)]

use rtrain_rl::{
    KlEstimator, KlPenalty, KlPlacement, LossAggregation, LossNormaliser, PolicyBatch, PolicyLossConfig, RlError,
};
use tch::{Kind, Tensor};

fn inputs(kind: Kind) -> (Tensor, Tensor, Tensor, Tensor) {
    tch::manual_seed(3);
    let opts = (kind, tch::Device::Cpu);
    let old = Tensor::randn([4, 5], opts) - 2.0;
    let behaviour = &old + Tensor::randn([4, 5], opts) * 0.5;
    let advantages = Tensor::randn([4, 5], opts) * 2.0;
    let mask =
        Tensor::from_slice(&[1.0f32, 1., 1., 1., 1., 1., 1., 0., 0., 0., 1., 0., 1., 1., 0., 1., 0., 0., 0., 0.])
            .view([4, 5])
            .to_kind(kind);
    (old, behaviour, advantages, mask)
}

#[test]
fn first_update_has_ratio_one_zero_kl_and_no_clipping() {
    for kind in [Kind::Float, Kind::Double] {
        let (old, behaviour, advantages, mask) = inputs(kind);
        let norm = LossNormaliser::from_mask(&mask).unwrap();
        let log_probs = old.copy().set_requires_grad(true);
        let config = PolicyLossConfig {
            clip_low: 0.2,
            clip_high: 0.28,
            dual_clip: Some(1.5),
            tis_cap: Some(2.0),
            kl: None,
            aggregation: LossAggregation::TokenMean,
        };
        let batch = PolicyBatch {
            log_probs: &log_probs,
            old_log_probs: &old,
            advantages: &advantages,
            mask: &mask,
            behaviour_log_probs: Some(&behaviour),
            ref_log_probs: None,
        };
        let out = config.compute(&batch, &norm).unwrap();
        assert!(bool::try_from(out.ratio.eq(1.0).all()).unwrap(), "ratio is not exactly 1: {}", out.ratio);
        assert_eq!(out.approx_kl.double_value(&[]), 0.0);
        assert_eq!(out.clip_fraction.double_value(&[]), 0.0);
        assert_eq!(out.dual_clip_fraction.double_value(&[]), 0.0);

        out.loss.backward();
        let weights = out.tis_weights.unwrap();
        let want = -(&advantages * &weights * &mask) / norm.tokens();
        let diff = (log_probs.grad() - want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{kind:?}: gradient differs from -A·w/N by {diff}");
    }
}

#[test]
fn a_kl_penalty_is_refused_in_the_wrong_place() {
    let (old, _, _, mask) = inputs(Kind::Double);
    let in_reward = KlPenalty { estimator: KlEstimator::K1, coef: 0.1, placement: KlPlacement::Reward };
    let config = PolicyLossConfig {
        clip_low: 0.2,
        clip_high: 0.2,
        dual_clip: None,
        tis_cap: None,
        kl: Some(in_reward),
        aggregation: LossAggregation::TokenMean,
    };
    assert!(matches!(config.validate(), Err(RlError::Config { name: "kl placement", .. })));
    let in_loss = KlPenalty { placement: KlPlacement::Loss, ..in_reward };
    let rewards = old.zeros_like();
    assert!(matches!(in_loss.shape_rewards(&rewards, &old, &old, &mask), Err(RlError::Config { .. })));
    let shaped = in_reward.shape_rewards(&rewards, &old, &(&old - 1.0), &mask).unwrap();
    assert_eq!(shaped.double_value(&[0, 0]), -0.1, "r - coef · (logp - ref)");
    assert_eq!(shaped.double_value(&[1, 4]), 0.0, "no penalty outside the mask");
}

#[test]
fn bad_hyper_parameters_are_refused() {
    let base = PolicyLossConfig {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: None,
        tis_cap: None,
        kl: None,
        aggregation: LossAggregation::TokenMean,
    };
    assert!(base.validate().is_ok());
    assert!(PolicyLossConfig { clip_low: 1.0, ..base }.validate().is_err());
    assert!(PolicyLossConfig { clip_high: f64::NAN, ..base }.validate().is_err());
    assert!(PolicyLossConfig { dual_clip: Some(1.0), ..base }.validate().is_err());
    assert!(PolicyLossConfig { tis_cap: Some(0.0), ..base }.validate().is_err());
    assert!(LossNormaliser::new(0.0, 1.0).is_err());
    assert!(LossNormaliser::from_mask(&Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu))).is_err());
}
