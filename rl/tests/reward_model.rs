//! Learned reward models against transformers: `LlamaForSequenceClassification` and
//! `Qwen2ForSequenceClassification` folders scored in batches equal the logits transformers
//! computes for each sequence alone (fixtures/reward_model/make_reward_models.py writes both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rtrain_core::config::RewardSpec;
use rtrain_rl::reward::{ModelReward, RewardError};
use rtrain_rl::{RewardInput, build_reward};
use rtrain_trainer::hf::Tokenizer;
use serde_json::{Map, Value};
use tch::Device;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward_model").join(name)
}

#[test]
fn scores_match_transformers_in_batches() {
    for name in ["llama_rm", "qwen2_rm"] {
        let dir = fixture(name);
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let record = Map::new();
        let inputs: Vec<RewardInput<'_>> = cases
            .iter()
            .map(|c| RewardInput {
                prompt: c["prompt"].as_str().unwrap(),
                response: c["response"].as_str().unwrap(),
                record: &record,
                ended: false,
            })
            .collect();
        for (input, case) in inputs.iter().zip(cases) {
            let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
            let text = format!("{}{}", input.prompt, input.response);
            assert_eq!(tokenizer.encode(&text, true).unwrap(), ids, "{name}: {text:?} tokenized as transformers does");
        }
        // Batches of 4 then 2 (right-padded to different lengths), and one at a time.
        for batch in [4, 1] {
            let mut reward = build_reward(&RewardSpec::Model { path: dir.clone(), batch }, Device::Cpu).unwrap();
            let scores = reward.score(&inputs).unwrap();
            assert_eq!(scores.len(), cases.len());
            for (i, (got, case)) in scores.iter().zip(cases).enumerate() {
                let want = case["score"].as_f64().unwrap();
                assert!((got.reward - want).abs() < 1e-5, "{name} batch {batch} case {i}: {} vs {want}", got.reward);
                assert_eq!(got.correct, None);
            }
        }
    }
}

#[test]
fn folders_that_are_not_one_label_classifiers_are_refused_by_path() {
    let lm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures/hf/llama_tiny");
    let e = ModelReward::load(&lm, 4, Device::Cpu).unwrap_err();
    assert!(matches!(&e, RewardError::Model { path, .. } if path == &lm), "{e}");
    assert!(e.to_string().contains("ForSequenceClassification"), "{e}");
    let missing = fixture("no_such_model");
    let e = ModelReward::load(&missing, 4, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("no_such_model"), "{e}");
}

#[test]
fn an_ended_response_is_closed_as_training_closes_it() {
    // The fixture's tokenizer has a chat template: an ended response closes with its end of turn.
    let dir = fixture("llama_rm");
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let end = tokenizer.turn_end_text().unwrap();
    assert!(end.starts_with("<|im_end|>"), "{end:?}");
    let model = rtrain_trainer::hf::RewardModel::load(&dir, Device::Cpu).unwrap();
    let record = Map::new();
    let input = |ended| RewardInput { prompt: "12+30=", response: "42", record: &record, ended };
    let mut reward = build_reward(&RewardSpec::Model { path: dir.clone(), batch: 2 }, Device::Cpu).unwrap();
    let scores = reward.score(&[input(true), input(false)]).unwrap();
    let open = model.score(&[tokenizer.encode("12+30=42", true).unwrap()]).unwrap()[0];
    let closed = model.score(&[tokenizer.encode(&format!("12+30=42{end}"), true).unwrap()]).unwrap()[0];
    assert!((scores[0].reward - closed).abs() < 1e-6 && (scores[1].reward - open).abs() < 1e-6);
    assert!((open - closed).abs() > 1e-4, "the end of turn changes the score, so the check above means something");
}
