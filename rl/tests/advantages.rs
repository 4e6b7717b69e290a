//! Properties of the advantage estimators that follow from their definitions (the reference
//! values themselves are checked in `reference.rs`).
#![allow(clippy::unwrap_used)]

use rtrain_rl::{Gae, GroupAdvantages, GroupScale, outcome_token_rewards, sequence_rewards};
use tch::Tensor;

fn t(v: &[f64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).view(shape)
}

#[test]
fn group_advantages_are_centred_per_group_and_zero_for_singletons_and_ties() {
    let scores = t(&[1.0, 0.0, 1.0, 0.0, 0.3, 0.5, 0.5], &[7]);
    let groups = [4, 4, 4, 4, 9, 2, 2];
    for scale in [GroupScale::UnbiasedStd, GroupScale::PopulationStd, GroupScale::None] {
        let adv = GroupAdvantages { scale, eps: 0.0 }.per_sequence(&scores, &groups).unwrap();
        let adv = Vec::<f64>::try_from(&adv).unwrap();
        assert!(adv[..4].iter().sum::<f64>().abs() < 1e-12, "{scale:?}: group 4 not centred");
        assert_eq!(&adv[4..], &[0.0, 0.0, 0.0], "{scale:?}: singleton and tied group");
        let want = match scale {
            GroupScale::UnbiasedStd => 0.5 / (1.0f64 / 3.0).sqrt(), // stdev of [1,0,1,0] = sqrt(1/3)
            GroupScale::PopulationStd => 1.0,                       // pstdev = 0.5
            GroupScale::None => 0.5,
        };
        assert!((adv[0] - want).abs() < 1e-12, "{scale:?}: {} vs {want}", adv[0]);
    }
}

#[test]
fn gae_with_unit_gamma_and_lambda_and_zero_values_is_the_reward_to_go() {
    let rewards = t(&[0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 9.0, 9.0], &[2, 4]);
    let mask = t(&[1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], &[2, 4]);
    let values = rewards.zeros_like();
    let out = Gae { gamma: 1.0, lambda: 1.0 }.estimate(&rewards, &values, &mask).unwrap();
    // Row 0 skips the masked token 1 (its reward 0.2 is ignored); row 1's padding adds nothing.
    let want = t(&[0.8, 0.0, 0.7, 0.4, 3.0, 2.0, 0.0, 0.0], &[2, 4]);
    assert!((&out.advantages - &want).abs().max().double_value(&[]) < 1e-12, "{}", out.advantages);
    assert!((&out.returns - &want).abs().max().double_value(&[]) < 1e-12);
    assert!(Gae { gamma: 1.5, lambda: 1.0 }.estimate(&rewards, &values, &mask).is_err());
}

#[test]
fn outcome_rewards_land_on_the_last_loss_token() {
    let mask = t(&[1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], &[3, 4]);
    let scores = t(&[2.0, 3.0, 5.0], &[3]);
    let rewards = outcome_token_rewards(&scores, &mask).unwrap();
    let want = t(&[0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0], &[3, 4]);
    assert_eq!(Vec::<f64>::try_from(rewards.view([-1])).unwrap(), Vec::<f64>::try_from(want.view([-1])).unwrap());
    let back = sequence_rewards(&rewards, &mask).unwrap();
    assert_eq!(Vec::<f64>::try_from(&back).unwrap(), [2.0, 0.0, 5.0], "an empty response gets no reward");
}
