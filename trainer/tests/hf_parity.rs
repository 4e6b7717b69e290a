//! Parity with Hugging Face transformers on tiny random Llama, Qwen2 and GPT-2 models: the
//! fixtures and their reference logits come from `fixtures/hf/make_hf_fixtures.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rtrain_trainer::hf::HfModel;
use tch::{Device, Kind, Tensor};

const MODELS: [&str; 5] = ["llama_tiny", "llama3_sharded", "qwen2_tiny", "llama_bf16", "gpt2_tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn reference(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn ids_tensor(rows: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<i64>> = serde_json::from_value(rows.clone()).unwrap();
    let (b, t) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([b, t])
}

fn max_abs_diff(got: &Tensor, want: &serde_json::Value) -> f64 {
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(want.clone()).unwrap();
    let flat: Vec<f32> = want.concat().concat();
    let want = Tensor::from_slice(&flat).view(got.size().as_slice());
    (got.to_kind(Kind::Float) - want).abs().max().double_value(&[])
}

#[test]
fn logits_match_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let model = HfModel::load(&dir, Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = reference(&dir);
        let logits = tch::no_grad(|| model.logits(&ids_tensor(&r["input_ids"])));
        let diff = max_abs_diff(&logits, &r["logits"]);
        eprintln!("{name}: max abs logit difference {diff:.1e}");
        assert!(diff < 1e-4, "{name}: logits differ from transformers by {diff}");
    }
}

#[test]
fn saved_models_reload_with_the_same_tensors_and_layout() {
    for name in MODELS {
        let dir = fixture(name);
        let model = HfModel::load(&dir, Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        let sharded = name == "llama3_sharded";
        let kind = if name == "llama_bf16" { Kind::BFloat16 } else { Kind::Float };
        model.save(out.path(), kind, if sharded { 150_000 } else { usize::MAX }).unwrap();
        // The same tensor names, shapes and dtypes as the transformers checkpoint.
        let listing = |d: &Path| {
            let mut v: Vec<(String, Vec<i64>, Kind)> = rtrain_trainer::hf::weights::read_dir_tensors(d)
                .unwrap()
                .into_iter()
                .map(|(n, t)| (n, t.size(), t.kind()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        assert_eq!(listing(out.path()), listing(&dir), "{name}");
        assert_eq!(out.path().join("model.safetensors.index.json").exists(), sharded, "{name}");
        let again = HfModel::load(out.path(), Device::Cpu).unwrap();
        let ids = ids_tensor(&reference(&dir)["input_ids"]);
        let (a, b) = tch::no_grad(|| (model.logits(&ids), again.logits(&ids)));
        assert_eq!((a - b).abs().max().double_value(&[]), 0.0, "{name}");
    }
}

#[test]
fn mismatched_weights_are_named() {
    let dir = fixture("llama_tiny");
    let out = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(file), out.path().join(file)).unwrap();
    }
    // Two layers in the file, three in the config; and a head size the file does not have.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 3.into();
    config["intermediate_size"] = 96.into();
    std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
    let err = HfModel::load(out.path(), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("missing model.layers.2.self_attn.q_proj.weight"), "{err}");
    assert!(
        err.contains("model.layers.0.mlp.up_proj.weight has shape [128, 64] in the file, the model needs [96, 64]"),
        "{err}"
    );

    config["model_type"] = "mamba".into();
    std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
    let err = HfModel::load(out.path(), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model_type `mamba` is not supported"), "{err}");
}
