//! Model folders and token ids a model cannot take are refused with a message, never a panic
//! or an abort: text past the model's positions, ids past its vocabulary, a config.json whose
//! sizes no machine could hold.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

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
        assert!(
            err.contains(&format!("{} tokens long, more than the model's {limit} positions", limit + 1)),
            "{name}: {err}"
        );

        let err = score(&model, &[1, vocab, 2]).unwrap_err().to_string();
        assert!(err.contains(&format!("token id {vocab}, past the model's vocabulary of {vocab}")), "{name}: {err}");
        let params = SamplingParams { max_new_tokens: 2, temperature: 0.0, ..SamplingParams::default() };
        let err = generate(&model, &tokenizer, &[vec![1, 2], vec![vocab + 7]], &params).unwrap_err().to_string();
        assert!(err.contains("the prompt holds token id"), "{name}: {err}");
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
}
