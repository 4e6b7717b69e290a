//! Groups of samples per prompt from one shared prefill: `generate_groups(prompts, G)` is
//! `generate` on each prompt repeated G times, token for token and log-prob for log-prob.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rtrain_trainer::hf::{FinishReason, Generation, HfModel, SamplingParams, Tokenizer, generate, generate_groups};
use tch::Device;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

/// The model, its tokenizer, and the reference prompts (of different lengths, so the prefill
/// batch is left-padded).
fn load(name: &str) -> (HfModel, Tokenizer, Vec<Vec<u32>>) {
    let dir = fixture(name);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let prompts = r["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::from_value(c["prompt_ids"].clone()).unwrap())
        .collect();
    (HfModel::load(&dir, Device::Cpu).unwrap(), Tokenizer::from_dir(&dir).unwrap(), prompts)
}

fn repeated(prompts: &[Vec<u32>], group_size: usize) -> Vec<Vec<u32>> {
    prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), group_size)).collect()
}

/// Same tokens, text and finish; log-probs equal up to the float rounding of a different batch
/// shape in the prefill.
fn assert_same(what: &str, got: &[Generation], want: &[Generation]) {
    assert_eq!(got.len(), want.len(), "{what}: sample count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            (&g.token_ids, &g.text, g.finish_reason),
            (&w.token_ids, &w.text, w.finish_reason),
            "{what} row {i}"
        );
        assert_eq!(g.logprobs.len(), w.logprobs.len());
        for (t, (a, b)) in g.logprobs.iter().zip(&w.logprobs).enumerate() {
            assert!((a - b).abs() < 1e-5, "{what} row {i} token {t}: {a} vs {b}");
        }
    }
}

#[test]
fn groups_equal_generate_on_repeated_prompts() {
    for name in ["llama_tiny", "qwen2_tiny", "gpt2_tiny"] {
        let (model, tok, prompts) = load(name);
        let g = 3;
        let sampled =
            SamplingParams { max_new_tokens: 12, temperature: 1.0, top_k: 50, seed: 11, ..Default::default() };
        let flat = generate(&model, &tok, &repeated(&prompts, g), &sampled).unwrap();
        // A stop token drawn from the first run ends some rows early and not others.
        let stop = flat[1].token_ids[3];
        let stopping = SamplingParams { stop_token_ids: vec![stop], ..sampled.clone() };
        for (label, params) in [("sampled", sampled), ("stopping", stopping)] {
            let what = format!("{name} {label}");
            let want = generate(&model, &tok, &repeated(&prompts, g), &params).unwrap();
            let groups = generate_groups(&model, &tok, &prompts, g, &params).unwrap();
            assert_eq!(groups.len(), prompts.len(), "{what}: one group per prompt");
            assert!(groups.iter().all(|s| s.len() == g), "{what}: group size");
            let got: Vec<Generation> = groups.into_iter().flatten().collect();
            assert_same(&what, &got, &want);
            assert!(
                got.chunks(g).any(|s| s.iter().any(|x| x.token_ids != s[0].token_ids)),
                "{what}: samples of a prompt draw from their own streams"
            );
            if label == "stopping" {
                assert!(got.iter().any(|x| x.finish_reason == FinishReason::Stop), "{what}: a row stopped");
                assert!(got.iter().any(|x| x.finish_reason == FinishReason::Length), "{what}: a row ran on");
            }
        }
    }
}

#[test]
fn group_size_one_is_generate_and_zero_is_refused() {
    let (model, tok, prompts) = load("llama_tiny");
    for params in [
        SamplingParams { max_new_tokens: 8, temperature: 0.0, ..Default::default() },
        SamplingParams { max_new_tokens: 8, temperature: 0.8, top_p: 0.9, seed: 3, ..Default::default() },
    ] {
        let want = generate(&model, &tok, &prompts, &params).unwrap();
        let groups = generate_groups(&model, &tok, &prompts, 1, &params).unwrap();
        assert!(groups.iter().all(|s| s.len() == 1));
        let got: Vec<Generation> = groups.into_iter().flatten().collect();
        // One row per prompt: the same computation, so exactly equal.
        assert_eq!(got, want);
    }
    let e = generate_groups(&model, &tok, &prompts, 0, &SamplingParams::default()).unwrap_err().to_string();
    assert!(e.contains("group_size") && e.contains("at least 1"), "{e}");
    let e = generate_groups(&model, &tok, &[vec![]], 2, &SamplingParams::default()).unwrap_err().to_string();
    assert!(e.contains("prompt"), "{e}");
    assert!(generate_groups(&model, &tok, &[], 4, &SamplingParams::default()).unwrap().is_empty());
}
