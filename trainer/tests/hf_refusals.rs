//! Model folders and token ids a model cannot take are refused with a message, never a panic
//! or an abort: text past the model's positions, ids past its vocabulary, a config.json whose
//! sizes no machine could hold.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rtrain_trainer::hf::{HfModel, SamplingParams, Tokenizer, generate, score};
use tch::Device;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

#[test]
fn text_past_the_context_and_ids_past_the_vocabulary_are_refused() {
    for name in ["gpt2_tiny", "llama_tiny", "qwen2_tiny"] {
        let dir = fixture(name);
        let model = HfModel::load(&dir, Device::Cpu).unwrap();
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let (vocab, limit) = (model.config.vocab_size() as u32, model.config.max_positions() as usize);

        // Exactly the model's positions: scored. One more: refused, naming both numbers.
        assert_eq!(score(&model, &vec![1; limit]).unwrap().len(), limit, "{name}");
        let err = score(&model, &vec![1; limit + 1]).unwrap_err().to_string();
        let want = format!("the text: {} tokens are more than the model's {limit} positions", limit + 1);
        assert!(err.contains(&want), "{name}: {err}");

        let err = score(&model, &[1, vocab, 2]).unwrap_err().to_string();
        let want = format!("the text: token id {vocab} is past the model's vocabulary of {vocab} tokens");
        assert!(err.contains(&want), "{name}: {err}");
        let params = SamplingParams { max_new_tokens: 2, temperature: 0.0, ..SamplingParams::default() };
        let err = generate(&model, &tokenizer, &[vec![1, 2], vec![vocab + 7]], &params).unwrap_err().to_string();
        assert!(err.contains(&format!("the prompt: token id {} is past", vocab + 7)), "{name}: {err}");
    }
}

#[test]
fn a_config_with_absurd_sizes_is_refused_before_anything_is_allocated() {
    let cases: [(&str, &str, serde_json::Value); 4] = [
        ("llama_tiny", "vocab_size", 1_000_000_000_000u64.into()),
        ("llama_tiny", "num_hidden_layers", 1_000_000_000u64.into()),
        ("gpt2_tiny", "vocab_size", 1_000_000_000_000u64.into()),
        ("llama_tiny", "hidden_size", i64::MAX.into()),
    ];
    for (name, key, value) in cases {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture(name)).unwrap().flatten() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[key] = value;
        std::fs::write(&path, config.to_string()).unwrap();
        let err = HfModel::load(dir.path(), Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("config.json: describes a model of"), "{name} {key}: {err}");
        assert!(err.contains("more than this machine's"), "{name} {key}: {err}");
    }
    // Sizes that are no sizes are named as such.
    for (key, value) in [("head_dim", -1), ("head_dim", 0), ("max_position_embeddings", -5)] {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture("llama_tiny")).unwrap().flatten() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[key] = value.into();
        std::fs::write(&path, config.to_string()).unwrap();
        let err = HfModel::load(dir.path(), Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(&format!("`{key}` is missing or not positive")), "{key} = {value}: {err}");
    }
}

/// Values a config.json key may hold: small sizes (a model that loads in milliseconds, or
/// zero and negative ones), sizes past any machine, floats, text, null.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        (-3i64..70).prop_map(serde_json::Value::from),
        prop::sample::select(vec![i64::MAX, i64::MIN, 1 << 40, 1_000_000_000_000]).prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::Value::from("64")),
        Just(serde_json::json!({ "rope_type": "linear" })),
    ]
}

const KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "n_inner",
    "layer_norm_epsilon",
    "model_type",
];

fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cases())]

    /// Any edit of a fixture's config.json loads, or is refused with a message: never a panic
    /// in libtorch (negative or zero sizes) nor an allocation no machine can make.
    #[test]
    fn edited_model_folders_load_or_are_refused_with_a_message(
        fixture_index in 0usize..3,
        edits in prop::collection::vec((prop::sample::select(KEYS), json_value()), 1..4),
    ) {
        let name = ["llama_tiny", "qwen2_tiny", "gpt2_tiny"][fixture_index];
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture(name)).unwrap().flatten() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (key, value) in &edits {
            config[*key] = value.clone();
        }
        std::fs::write(&path, config.to_string()).unwrap();
        if let Err(e) = HfModel::load(dir.path(), Device::Cpu) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }
}
