//! Generation and scoring against transformers' greedy continuations and log-probabilities
//! (fixtures/hf/*/reference.json), and the sampling controls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rtrain_trainer::hf::{FinishReason, HfModel, SamplingParams, Tokenizer, generate, score};
use tch::Device;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn load(name: &str) -> (HfModel, Tokenizer, serde_json::Value) {
    let dir = fixture(name);
    let r = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    (HfModel::load(&dir, Device::Cpu).unwrap(), Tokenizer::from_dir(&dir).unwrap(), r)
}

fn greedy(max_new_tokens: usize) -> SamplingParams {
    SamplingParams { max_new_tokens, temperature: 0.0, ..SamplingParams::default() }
}

#[test]
fn greedy_continuations_match_transformers_alone_and_batched() {
    for name in ["llama_tiny", "llama3_sharded", "qwen2_tiny", "llama_bf16", "gpt2_tiny"] {
        let (model, tok, r) = load(name);
        let cases = r["greedy"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> =
            cases.iter().map(|c| serde_json::from_value(c["prompt_ids"].clone()).unwrap()).collect();
        let want: Vec<Vec<u32>> =
            cases.iter().map(|c| serde_json::from_value(c["output_ids"].clone()).unwrap()).collect();
        let n = cases[0]["max_new_tokens"].as_u64().unwrap() as usize;
        // Prompts of different lengths in one (left-padded) batch, and each alone.
        let batched = generate(&model, &tok, &prompts, &greedy(n)).unwrap();
        for (i, g) in batched.iter().enumerate() {
            assert_eq!(g.token_ids, want[i], "{name} prompt {i} in a batch");
            assert_eq!(g.finish_reason, FinishReason::Length);
            assert_eq!(g.logprobs.len(), n);
            assert_eq!(g.text, tok.decode(&g.token_ids, true).unwrap());
            let alone = generate(&model, &tok, &prompts[i..=i], &greedy(n)).unwrap();
            assert_eq!(alone[0].token_ids, want[i], "{name} prompt {i} alone");
        }
    }
}

#[test]
fn scores_match_transformers_log_probs() {
    for name in ["llama_tiny", "qwen2_tiny", "gpt2_tiny"] {
        let (model, _, r) = load(name);
        let ids: Vec<u32> = serde_json::from_value(r["input_ids"][0].clone()).unwrap();
        let want: Vec<f64> = serde_json::from_value(r["score"].clone()).unwrap();
        let got = score(&model, &ids).unwrap();
        assert_eq!(got[0], None);
        for (t, (g, w)) in got[1..].iter().zip(&want).enumerate() {
            assert!((g.unwrap() - w).abs() < 1e-4, "{name} token {}: {g:?} vs {w}", t + 1);
        }
    }
}

#[test]
fn sampling_is_seeded_and_honours_its_controls() {
    let (model, tok, r) = load("llama_tiny");
    let prompt: Vec<u32> = serde_json::from_value(r["greedy"][1]["prompt_ids"].clone()).unwrap();
    let prompts = vec![prompt.clone(); 4];
    let params = SamplingParams { max_new_tokens: 10, temperature: 1.0, seed: 7, ..SamplingParams::default() };
    let a = generate(&model, &tok, &prompts, &params).unwrap();
    let b = generate(&model, &tok, &prompts, &params).unwrap();
    assert_eq!(a, b, "same seed, same samples");
    assert!(a.iter().any(|g| g.token_ids != a[0].token_ids), "rows draw from their own streams");
    let c = generate(&model, &tok, &prompts, &SamplingParams { seed: 8, ..params.clone() }).unwrap();
    assert_ne!(a, c, "another seed, other samples");
    // Row 0 samples the same alone as in the batch (log-probs up to the batch's float rounding).
    let alone = generate(&model, &tok, &prompts[..1], &params).unwrap();
    assert_eq!((&alone[0].token_ids, alone[0].finish_reason), (&a[0].token_ids, a[0].finish_reason));
    for (x, y) in alone[0].logprobs.iter().zip(&a[0].logprobs) {
        assert!((x - y).abs() < 1e-5);
    }

    // top_k = 1 and a tiny top_p are greedy, whatever the temperature.
    let greedy_out = generate(&model, &tok, &prompts[..1], &greedy(10)).unwrap();
    for p in [
        SamplingParams { top_k: 1, temperature: 5.0, ..params.clone() },
        SamplingParams { top_p: 1e-9, temperature: 5.0, ..params.clone() },
    ] {
        assert_eq!(generate(&model, &tok, &prompts[..1], &p).unwrap()[0].token_ids, greedy_out[0].token_ids);
    }
    // Log-probs are the model's, whatever the sampling settings.
    let scored = score(&model, &[prompt.clone(), greedy_out[0].token_ids.clone()].concat()).unwrap();
    for (i, lp) in greedy_out[0].logprobs.iter().enumerate() {
        assert!((lp - scored[prompt.len() + i].unwrap()).abs() < 1e-4);
    }

    // A stop token ends a sequence (kept); a stop string cuts the text.
    let third = greedy_out[0].token_ids[2];
    let stopped =
        generate(&model, &tok, &prompts[..1], &SamplingParams { stop_token_ids: vec![third], ..greedy(10) }).unwrap();
    assert_eq!(stopped[0].finish_reason, FinishReason::Stop);
    assert_eq!(stopped[0].token_ids.last(), Some(&third));
    assert!(stopped[0].token_ids.len() <= 3);
    let text = &greedy_out[0].text;
    let needle: String = text.chars().skip(text.chars().count() / 2).take(2).collect();
    let cut =
        generate(&model, &tok, &prompts[..1], &SamplingParams { stop_strings: vec![needle.clone()], ..greedy(10) })
            .unwrap();
    assert_eq!(cut[0].finish_reason, FinishReason::Stop);
    assert!(
        !cut[0].text.contains(&needle) && text.starts_with(&cut[0].text),
        "{:?} cut at {needle:?}: {:?}",
        text,
        cut[0].text
    );
}

#[test]
fn log_probs_at_the_sampling_temperature_are_of_the_tempered_distribution() {
    let (model, tok, r) = load("llama_tiny");
    let prompt: Vec<u32> = serde_json::from_value(r["greedy"][1]["prompt_ids"].clone()).unwrap();
    let t = 0.5;
    let raw = SamplingParams { max_new_tokens: 6, temperature: t, seed: 3, ..SamplingParams::default() };
    let tempered = SamplingParams { logprobs_at_temperature: true, ..raw.clone() };
    let (a, b) = (
        generate(&model, &tok, &[prompt.clone()], &raw).unwrap(),
        generate(&model, &tok, &[prompt.clone()], &tempered).unwrap(),
    );
    assert_eq!(a[0].token_ids, b[0].token_ids, "the flag changes what is reported, not what is sampled");
    // log softmax(z / T)[token], from the model's logits over the whole sequence.
    let ids: Vec<i64> = prompt.iter().chain(&b[0].token_ids).map(|&i| i64::from(i)).collect();
    let logits = model.logits(&tch::Tensor::from_slice(&ids).view([1, -1])).squeeze_dim(0);
    let expected = (logits / t).log_softmax(-1, tch::Kind::Double);
    for (i, (&token, lp)) in b[0].token_ids.iter().zip(&b[0].logprobs).enumerate() {
        let want = expected.double_value(&[(prompt.len() + i - 1) as i64, i64::from(token)]);
        assert!((lp - want).abs() < 1e-4, "token {i}: {lp} vs {want}");
        assert!((lp - a[0].logprobs[i]).abs() > 1e-6 || a[0].logprobs[i] > -1e-6, "the raw log-probs differ");
    }
}

/// A stop text that names a special token (`<|im_start|>`) ends the sequence at that token,
/// though decoding leaves special tokens out of the text.
#[test]
fn a_stop_text_naming_a_special_token_stops_at_it() {
    let (model, tok, _) = load("qwen2_tiny");
    let start = tok.special_token_id("<|im_start|>").expect("a special token");
    assert_eq!(tok.special_token_id("hello"), None);
    // Nearly uniform sampling over the 320-token vocabulary reaches the special token.
    let prompts = vec![tok.encode("The quick brown fox", true).unwrap(); 16];
    let hot = SamplingParams { max_new_tokens: 60, temperature: 100.0, seed: 11, ..SamplingParams::default() };
    let free = generate(&model, &tok, &prompts, &hot).unwrap();
    let (row, at) = free
        .iter()
        .enumerate()
        .find_map(|(i, g)| g.token_ids.iter().position(|&t| t == start).map(|at| (i, at)))
        .expect("some sample draws <|im_start|> (seed 11)");
    let stop = SamplingParams { stop_strings: vec!["<|im_start|>".into()], ..hot };
    let stopped = generate(&model, &tok, &prompts, &stop).unwrap();
    assert_eq!(stopped[row].token_ids, free[row].token_ids[..=at], "the same draws up to the special token");
    assert_eq!(stopped[row].finish_reason, FinishReason::Stop);
    assert!(!stopped[row].text.contains("<|im_start|>"));
}
