//! Checks the GPT, FlatParams, clipping and AdamW against an independent PyTorch implementation.
//!
//! Reference values come from `tests/fixtures/make_gpt_reference.py` (plain PyTorch 2.11 on CPU,
//! `torch.optim.AdamW` with weight decay on >= 2-D parameters only and `clip_grad_norm_(1.0)`),
//! which wrote `tests/fixtures/gpt_tiny/`. Rerun that script to regenerate them.

use std::collections::HashMap;
use std::path::PathBuf;

use rtrain_trainer::model::GptConfig;
use rtrain_trainer::optim::{AdamW, AdamWConfig, FlatParams};
use rtrain_trainer::precision::{Precision, autocast};
use tch::{Device, Kind, Tensor, nn};

const TOL: f64 = 1e-5;
/// bf16 against bf16: the same autocast policy; on the machine that wrote the fixture the values
/// are identical, elsewhere bf16 kernels may round a few values differently (one bf16 step is
/// 2^-8 relative). The parameters after 3 steps are the test that tells bf16 from float32.
const BF16_TOL: f64 = 5e-3;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt_tiny").join(name)
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(name))
        .unwrap_or_else(|e| panic!("reading fixture {name}: {e}"))
        .into_iter()
        .collect()
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json is JSON")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn f64_list(v: &serde_json::Value, key: &str) -> Vec<f64> {
    v[key].as_array().expect(key).iter().map(|x| x.as_f64().expect(key)).collect()
}

/// The tiny model from the fixture's config, with its initial weights loaded *after* the
/// parameters were re-homed, so the load also exercises writing through the flat views.
fn tiny_model() -> (nn::VarStore, rtrain_trainer::model::Gpt, FlatParams) {
    let cfg: GptConfig = serde_json::from_value(reference()["config"].clone()).expect("config");
    assert_eq!(cfg, GptConfig { vocab_size: 256, n_ctx: 16, n_layer: 2, n_head: 2, n_embd: 32 });
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = cfg.init(&vs.root());
    let flat = FlatParams::new(&vs);
    vs.load(fixture("weights.safetensors")).expect("load weights");
    (vs, model, flat)
}

#[test]
fn logits_and_loss_match_pytorch() {
    let (vs, model, flat) = tiny_model();
    let weights = tensors("weights.safetensors");
    assert_eq!(weights.len(), vs.variables().len(), "fixture and model name different variables");
    for entry in flat.entries() {
        let loaded = flat.view(flat.params(), entry);
        assert_eq!(max_abs_diff(&loaded, &weights[&entry.name]), 0.0, "{}", entry.name);
    }

    let batch = tensors("batch.safetensors");
    let (inputs, targets) = (batch["inputs"].get(0), batch["targets"].get(0));
    let logits = tch::no_grad(|| model.forward(&inputs));
    let diff = max_abs_diff(&logits, &batch["logits"]);
    assert!(diff < TOL, "logits differ by {diff}");

    let loss = tch::no_grad(|| model.loss(&inputs, &targets)).double_value(&[]);
    let want = f64_list(&reference(), "losses")[0];
    assert!((loss - want).abs() < TOL, "loss {loss} vs PyTorch {want}");
}

#[test]
fn three_clipped_adamw_steps_match_pytorch() {
    let (vs, model, mut flat) = tiny_model();
    let reference = reference();
    let (losses, norms) = (f64_list(&reference, "losses"), f64_list(&reference, "grad_norms"));
    let batch = tensors("batch.safetensors");
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(cfg, &flat);

    for step in 0..3 {
        flat.zero_grads();
        let inputs = batch["inputs"].get(step);
        let loss = model.loss(&inputs, &batch["targets"].get(step));
        loss.backward();
        flat.gather_grads();
        let norm = flat.clip_grad_norm(1.0);
        let i = step as usize;
        assert!((loss.double_value(&[]) - losses[i]).abs() < TOL, "loss at step {step}");
        assert!((norm - norms[i]).abs() < TOL * norms[i].max(1.0), "norm {norm} at step {step}");
        opt.step(&flat, 1e-3);
    }
    assert_eq!(opt.step_count(), 3);
    assert!(norms.iter().any(|&n| n > 1.0), "fixture should exercise clipping: {norms:?}");

    let variables = vs.variables();
    for (name, want) in tensors("after_3_steps.safetensors") {
        let diff = max_abs_diff(&variables[&name], &want);
        assert!(diff < TOL, "{name} differs from PyTorch by {diff} after 3 steps");
    }
}

/// How far apart two runs are: the largest difference of any parameter after the 3 steps.
fn max_param_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    a.iter().map(|(name, t)| max_abs_diff(t, &b[name])).fold(0.0, f64::max)
}

#[test]
fn three_bf16_autocast_steps_match_pytorch_autocast() {
    let (vs, model, mut flat) = tiny_model();
    let reference = reference();
    let (losses, norms) = (f64_list(&reference, "bf16_losses"), f64_list(&reference, "bf16_grad_norms"));
    let fp32_losses = f64_list(&reference, "losses");
    let batch = tensors("batch.safetensors");
    let bf16 = tensors("bf16.safetensors");
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(cfg, &flat);
    let mut report = Vec::new();

    for step in 0..3 {
        flat.zero_grads();
        let inputs = batch["inputs"].get(step);
        let (logits, loss) = autocast(Precision::Bf16, Device::Cpu, || {
            (model.forward(&inputs), model.loss(&inputs, &batch["targets"].get(step)))
        })
        .expect("autocast");
        if step == 0 {
            assert_eq!(logits.kind(), Kind::BFloat16, "the head's matmul should run in bf16");
            let diff = max_abs_diff(&logits.to_kind(Kind::Float), &bf16["logits"].to_kind(Kind::Float));
            report.push(format!("logits {diff:.2e}"));
            assert!(diff < BF16_TOL, "logits differ from PyTorch's autocast by {diff}");
        }
        assert_eq!(loss.kind(), Kind::Float, "autocast keeps the loss in float32");
        loss.backward();
        flat.gather_grads();
        assert_eq!(flat.grads().kind(), Kind::Float, "gradients of the float32 master weights");
        let norm = flat.clip_grad_norm(1.0);
        let i = step as usize;
        let loss = loss.double_value(&[]);
        report.push(format!("loss {:.2e} (fp32 {:.2e})", (loss - losses[i]).abs(), (loss - fp32_losses[i]).abs()));
        assert!((loss - losses[i]).abs() < BF16_TOL, "loss {loss} vs PyTorch {} at step {step}", losses[i]);
        assert!((norm - norms[i]).abs() < BF16_TOL * norms[i], "norm {norm} vs {} at step {step}", norms[i]);
        opt.step(&flat, 1e-3);
    }

    let variables = vs.variables();
    let mine: HashMap<String, Tensor> = variables.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let want: HashMap<String, Tensor> = bf16
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("after_3_steps.").map(|n| (n.to_string(), t.shallow_clone())))
        .collect();
    assert_eq!(want.len(), mine.len());
    assert!(mine.values().all(|t| t.kind() == Kind::Float), "master weights stay float32");
    let diff = max_param_diff(&mine, &want);
    // The test must tell bf16 from float32: the float32 run ends further from PyTorch's bf16 run
    // than this one does.
    let fp32_gap = max_param_diff(&tensors("after_3_steps.safetensors"), &want);
    report.push(format!("parameters {diff:.2e} (fp32 run {fp32_gap:.2e})"));
    eprintln!("bf16 against PyTorch autocast: {}", report.join(", "));
    assert!(diff < fp32_gap / 2.0, "parameters differ from PyTorch's autocast run by {diff} (fp32 run: {fp32_gap})");
}
