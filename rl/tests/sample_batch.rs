//! The sample schema survives JSON, malformed samples are refused, and collation puts every token
//! where the documented layout says (left-padded prompts, right-padded responses).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use rtrain_rl::{FinishReason, Reward, RlError, Sample, collate};
use tch::{Device, Kind, Tensor};

fn sample(prompt: &[u32], response: &[u32], mask: &[bool], group_id: u64) -> Sample {
    Sample {
        prompt_id: format!("p{group_id}"),
        group_id,
        prompt_token_ids: prompt.to_vec(),
        response_token_ids: response.to_vec(),
        loss_mask: mask.to_vec(),
        behaviour_log_probs: (0..response.len()).map(|i| -0.5 - i as f32).collect(),
        policy_version: 3,
        reward: Reward { total: group_id as f64, components: BTreeMap::from([("format".to_string(), 0.25)]) },
        finish_reason: FinishReason::Stop,
    }
}

#[test]
fn sample_round_trips_through_json() {
    let s = sample(&[1, 2], &[5, 6, 7], &[true, false, true], 9);
    let text = s.to_json().unwrap();
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    assert_eq!(Sample::from_json(&text).unwrap(), s);
    // Components are optional on the wire.
    let bare = text.replace(",\"components\":{\"format\":0.25}", "");
    assert!(Sample::from_json(&bare).unwrap().reward.components.is_empty());
}

#[test]
fn malformed_samples_are_refused() {
    let mut s = sample(&[1], &[5, 6], &[true], 1);
    assert!(matches!(s.validate(), Err(RlError::SampleLength { field: "loss_mask", expected: 2, got: 1, .. })));
    s.loss_mask.push(true);
    s.behaviour_log_probs[1] = f32::NAN;
    assert!(s.validate().is_err());
    assert!(matches!(collate(&[s], 0, Kind::Float, Device::Cpu), Err(RlError::Config { .. })));
    assert!(Sample::from_json("{\"prompt_id\": 1}").is_err());
    assert!(matches!(collate::<Sample>(&[], 0, Kind::Float, Device::Cpu), Err(RlError::Empty { .. })));
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    Vec::<Vec<f64>>::try_from(t.to_kind(Kind::Double)).unwrap()
}

#[test]
fn collation_left_pads_prompts_and_right_pads_responses() {
    let samples = [sample(&[11, 12, 13], &[21], &[true], 1), sample(&[14], &[22, 23, 24], &[true, false, true], 2)];
    let b = collate(&samples, 0, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(b.prompt_len, 3);
    assert_eq!(rows(&b.input_ids), [[11., 12., 13., 21., 0., 0.], [0., 0., 14., 22., 23., 24.]]);
    assert_eq!(rows(&b.attention_mask), [[1., 1., 1., 1., 0., 0.], [0., 0., 1., 1., 1., 1.]]);
    assert_eq!(rows(&b.position_ids), [[0., 1., 2., 3., 3., 3.], [0., 0., 0., 1., 2., 3.]]);
    assert_eq!(rows(&b.response_ids), [[21., 0., 0.], [22., 23., 24.]]);
    assert_eq!(rows(&b.loss_mask), [[1., 0., 0.], [1., 0., 1.]]);
    assert_eq!(rows(&b.behaviour_log_probs), [[-0.5, 0., 0.], [-0.5, -1.5, -2.5]]);
    assert_eq!(Vec::<f64>::try_from(&b.scores).unwrap(), [1.0, 2.0]);
    assert_eq!((b.group_ids.clone(), b.policy_versions.clone()), (vec![1, 2], vec![3, 3]));
}

#[test]
fn response_log_probs_read_the_logits_one_column_before_each_token() {
    let samples = [sample(&[1, 2], &[3, 4], &[true, true], 1), sample(&[5], &[6], &[true], 2)];
    let b = collate(&samples, 0, Kind::Float, Device::Cpu).unwrap();
    tch::manual_seed(1);
    let logits = Tensor::randn([2, 4, 8], (Kind::Float, Device::Cpu));
    let got = b.response_log_probs(&logits).unwrap();
    let log_softmax = logits.log_softmax(-1, Kind::Float);
    // Row 0 = [1, 2 | 3, 4]: token 3 at column 2 is predicted by column 1, token 4 by column 2.
    let want = |row: i64, col: i64, tok: i64| log_softmax.double_value(&[row, col, tok]);
    assert_eq!(got.double_value(&[0, 0]), want(0, 1, 3));
    assert_eq!(got.double_value(&[0, 1]), want(0, 2, 4));
    // Row 1 = [pad, 5 | 6, pad]: token 6 is predicted by column 1, where the prompt ends.
    assert_eq!(got.double_value(&[1, 0]), want(1, 1, 6));
    assert!(b.response_log_probs(&logits.narrow(1, 0, 3)).is_err());
}
