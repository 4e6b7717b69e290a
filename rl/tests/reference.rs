//! Checks rtrain-rl's numerics against an independent plain-Python implementation.
//!
//! Reference values come from `tests/fixtures/make_rl_reference.py` (standard library only, the
//! published TRL/veRL formulas written out per token), which wrote
//! `tests/fixtures/rl_reference.json`, inputs included. Rerun that script to regenerate it. Every
//! check runs in f64 (tolerance 1e-6) and in f32 (1e-5).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use rtrain_rl::{
    Gae, GroupAdvantages, GroupScale, KlEstimator, KlPenalty, KlPlacement, LossAggregation, LossNormaliser,
    PolicyBatch, PolicyLossConfig, ValueLossConfig, entropy_from_logits, masked_whiten, outcome_token_rewards,
    tis_weights, token_log_probs,
};
use serde_json::Value;
use tch::{Kind, Tensor};

const KINDS: [(Kind, f64); 2] = [(Kind::Double, 1e-6), (Kind::Float, 1e-5)];
const MODES: [&str; 3] = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"];

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rl_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A nested JSON array of numbers as a tensor of `kind`.
fn tensor(v: &Value, kind: Kind) -> Tensor {
    fn walk(v: &Value, shape: &mut Vec<i64>, depth: usize, out: &mut Vec<f64>) {
        match v {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len() as i64);
                }
                items.iter().for_each(|x| walk(x, shape, depth + 1, out));
            }
            x => out.push(x.as_f64().unwrap()),
        }
    }
    let (mut shape, mut data) = (vec![], vec![]);
    walk(v, &mut shape, 0, &mut data);
    Tensor::from_slice(&data).view(shape.as_slice()).to_kind(kind)
}

fn assert_close(what: &str, got: &Tensor, want: &Value, tol: f64) {
    let want = tensor(want, Kind::Double);
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let diff = (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]);
    assert!(diff <= tol, "{what}: differs from the reference by {diff} (> {tol}) in {:?}", got.kind());
}

struct Inputs {
    r: Value,
    kind: Kind,
}

impl Inputs {
    fn t(&self, key: &str) -> Tensor {
        tensor(&self.r["inputs"][key], self.kind)
    }
    fn f(&self, key: &str) -> f64 {
        self.r["inputs"][key].as_f64().unwrap()
    }
    fn group_ids(&self) -> Vec<u64> {
        self.r["inputs"]["group_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    }
    fn norm(&self) -> LossNormaliser {
        LossNormaliser::from_mask(&self.t("mask")).unwrap()
    }
    fn aggregation(&self, mode: &str) -> LossAggregation {
        match mode {
            "token-mean" => LossAggregation::TokenMean,
            "seq-mean-token-mean" => LossAggregation::SeqMeanTokenMean,
            _ => LossAggregation::SeqMeanTokenSumNorm { length: self.f("sum_norm_length") },
        }
    }
    /// Token rewards: outcome on the last loss token, minus k1 KL (old vs ref) in the reward.
    fn token_rewards(&self) -> Tensor {
        let mask = self.t("mask");
        let outcome = outcome_token_rewards(&self.t("scores"), &mask).unwrap();
        let kl =
            KlPenalty { estimator: KlEstimator::K1, coef: self.f("kl_reward_coef"), placement: KlPlacement::Reward };
        kl.shape_rewards(&outcome, &self.t("old_log_probs"), &self.t("ref_log_probs"), &mask).unwrap()
    }
    fn gae(&self) -> rtrain_rl::GaeEstimate {
        let gae = Gae { gamma: self.f("gamma"), lambda: self.f("lambda") };
        gae.estimate(&self.token_rewards(), &self.t("values"), &self.t("mask")).unwrap()
    }
}

fn each_kind(check: impl Fn(&Inputs, f64)) {
    let r = reference();
    for (kind, tol) in KINDS {
        check(&Inputs { r: r.clone(), kind }, tol);
    }
}

#[test]
fn normaliser_counts_loss_tokens_and_non_empty_sequences() {
    each_kind(|x, _| {
        let norm = x.norm();
        assert_eq!(norm.tokens(), x.r["normaliser"]["tokens"].as_f64().unwrap());
        assert_eq!(norm.sequences(), x.r["normaliser"]["sequences"].as_f64().unwrap());
    });
}

#[test]
fn grpo_advantages_match_reference_in_every_scale_mode() {
    each_kind(|x, tol| {
        let eps = x.f("group_eps");
        for (name, scale) in [
            ("unbiased-std", GroupScale::UnbiasedStd),
            ("population-std", GroupScale::PopulationStd),
            ("none", GroupScale::None),
        ] {
            let adv = GroupAdvantages { scale, eps }.per_sequence(&x.t("scores"), &x.group_ids()).unwrap();
            assert_close(&format!("grpo {name}"), &adv, &x.r["grpo"][name], tol);
        }
        let per_token = GroupAdvantages { scale: GroupScale::UnbiasedStd, eps }
            .per_token(&x.t("scores"), &x.group_ids(), &x.t("mask"))
            .unwrap();
        assert_close("grpo per token", &per_token, &x.r["grpo_per_token"], tol);
    });
}

#[test]
fn kl_estimators_match_reference() {
    each_kind(|x, tol| {
        for (name, est) in [("k1", KlEstimator::K1), ("k2", KlEstimator::K2), ("k3", KlEstimator::K3)] {
            let kl = est.per_token(&x.t("log_probs"), &x.t("ref_log_probs")).unwrap();
            assert_close(name, &kl, &x.r["kl"][name], tol);
        }
    });
}

#[test]
fn gae_advantages_returns_and_whitening_match_reference() {
    each_kind(|x, tol| {
        assert_close("token rewards", &x.token_rewards(), &x.r["token_rewards"], tol);
        let gae = x.gae();
        assert_close("gae advantages", &gae.advantages, &x.r["gae_advantages"], tol);
        assert_close("gae returns", &gae.returns, &x.r["gae_returns"], tol);
        let white = masked_whiten(&gae.advantages, &x.t("mask"), true).unwrap();
        assert_close("whitened", &white, &x.r["whitened"], tol);
        let scaled = masked_whiten(&gae.advantages, &x.t("mask"), false).unwrap();
        assert_close("whitened without shift", &scaled, &x.r["whitened_no_shift"], tol);
    });
}

#[test]
fn tis_weights_match_reference() {
    each_kind(|x, tol| {
        let cap = x.r["inputs"]["policy_full"]["tis_cap"].as_f64().unwrap();
        let w = tis_weights(&x.t("old_log_probs"), &x.t("behaviour_log_probs"), cap).unwrap();
        assert_close("tis weights", &w, &x.r["tis_weights"], tol);
    });
}

fn policy_config(x: &Inputs, key: &str, mode: &str) -> PolicyLossConfig {
    let c = &x.r["inputs"][key];
    let kl =
        c["kl_coef"].as_f64().map(|coef| KlPenalty { estimator: KlEstimator::K3, coef, placement: KlPlacement::Loss });
    PolicyLossConfig {
        clip_low: c["clip_low"].as_f64().unwrap(),
        clip_high: c["clip_high"].as_f64().unwrap(),
        dual_clip: c["dual_clip"].as_f64(),
        tis_cap: c["tis_cap"].as_f64(),
        kl,
        aggregation: x.aggregation(mode),
    }
}

#[test]
fn policy_loss_metrics_and_gradient_match_reference_for_every_aggregation() {
    each_kind(|x, tol| {
        let mask = x.t("mask");
        let advantages = masked_whiten(&x.gae().advantages, &mask, true).unwrap();
        let (old, behaviour, reference) = (x.t("old_log_probs"), x.t("behaviour_log_probs"), x.t("ref_log_probs"));
        for (config_key, want_key) in [("policy", "policy_loss"), ("policy_full", "policy_loss_full")] {
            for mode in MODES {
                let log_probs = x.t("log_probs").set_requires_grad(true);
                let batch = PolicyBatch {
                    log_probs: &log_probs,
                    old_log_probs: &old,
                    advantages: &advantages,
                    mask: &mask,
                    behaviour_log_probs: Some(&behaviour),
                    ref_log_probs: Some(&reference),
                };
                let out = policy_config(x, config_key, mode).compute(&batch, &x.norm()).unwrap();
                let want = &x.r[want_key][mode];
                let label = |m: &str| format!("{want_key} {mode} {m}");
                assert_close(&label("loss"), &out.loss, &want["loss"], tol);
                assert_close(&label("pg_loss"), &out.pg_loss, &want["pg_loss"], tol);
                let kl_loss = out.kl_loss.as_ref().map_or(0.0, |t| t.double_value(&[]));
                assert!((kl_loss - want["kl_loss"].as_f64().unwrap()).abs() <= tol, "{}", label("kl_loss"));
                assert_close(&label("clip fraction"), &out.clip_fraction, &want["clip_fraction"], tol);
                assert_close(&label("dual clip fraction"), &out.dual_clip_fraction, &want["dual_clip_fraction"], tol);
                assert_close(&label("approx kl"), &out.approx_kl, &want["approx_kl"], tol);
                out.loss.backward();
                assert_close(&label("d loss / d logp"), &log_probs.grad(), &want["grad_log_probs"], tol);
            }
        }
        // The fixture must exercise what it claims to check.
        let full = &x.r["policy_loss_full"]["token-mean"];
        assert!(full["clip_fraction"].as_f64().unwrap() > 0.0 && full["dual_clip_fraction"].as_f64().unwrap() > 0.0);
    });
}

#[test]
fn value_loss_matches_reference_for_every_aggregation() {
    each_kind(|x, tol| {
        let returns = x.gae().returns;
        for mode in MODES {
            let config = ValueLossConfig { clip: Some(x.f("value_clip")), aggregation: x.aggregation(mode) };
            let out = config.compute(&x.t("new_values"), &x.t("values"), &returns, &x.t("mask"), &x.norm()).unwrap();
            assert_close(&format!("value loss {mode}"), &out.loss, &x.r["value_loss"][mode]["loss"], tol);
            let want = &x.r["value_loss"][mode]["clip_fraction"];
            assert_close(&format!("value clip fraction {mode}"), &out.clip_fraction, want, tol);
        }
    });
}

#[test]
fn entropy_and_token_log_probs_match_reference() {
    each_kind(|x, tol| {
        let logits = x.t("logits");
        assert_close("entropy", &entropy_from_logits(&logits), &x.r["entropy"], tol);
        let tokens = x.t("tokens").to_kind(Kind::Int64);
        assert_close("token log-probs", &token_log_probs(&logits, &tokens).unwrap(), &x.r["token_log_probs"], tol);
    });
}
