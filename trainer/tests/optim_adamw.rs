//! AdamW on the flat buffer against a scalar f64 transcription of `torch.optim.AdamW`'s update
//! (torch/optim/adam.py, `_single_tensor_adam` with `decoupled_weight_decay=True`), and resume.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use rtrain_trainer::optim::{AdamW, AdamWConfig, FlatParams};
use tch::{Device, Tensor, nn};

/// A matrix (decayed) and a vector (not decayed): 6 + 4 parameters.
fn store() -> (nn::VarStore, FlatParams) {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = root.var_copy("m", &Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0, 0.25, -0.75]).view([2, 3]));
    let _ = root.var_copy("b", &Tensor::from_slice(&[1.0f32, -2.0, 0.1, 0.0]));
    let flat = FlatParams::new(&vs);
    (vs, flat)
}

fn grads_for(step: usize) -> Vec<f32> {
    (0..10).map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.1 - 0.5).collect()
}

fn set_grads(flat: &mut FlatParams, g: &[f32]) {
    flat.grads_mut().copy_(&Tensor::from_slice(g));
}

#[test]
fn matches_torch_adamw_update() {
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let (_vs, mut flat) = store();
    assert_eq!(flat.decay_numel(), 6);
    let mut opt = AdamW::new(cfg, &flat);

    let mut p: Vec<f64> = Vec::<f32>::try_from(flat.params()).unwrap().iter().map(|&x| x.into()).collect();
    let (mut m, mut v) = (vec![0f64; 10], vec![0f64; 10]);
    for step in 1..=6 {
        let lr = 1e-2 * step as f64;
        let g = grads_for(step);
        set_grads(&mut flat, &g);
        opt.step(&flat, lr);

        let bc1 = 1.0 - cfg.beta1.powi(step as i32);
        let bc2 = 1.0 - cfg.beta2.powi(step as i32);
        for i in 0..10 {
            let g = f64::from(g[i]);
            if i < 6 {
                p[i] *= 1.0 - lr * cfg.weight_decay;
            }
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
            p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + cfg.eps);
        }
        let got = Vec::<f32>::try_from(flat.params()).unwrap();
        for i in 0..10 {
            assert!((f64::from(got[i]) - p[i]).abs() < 1e-6, "step {step} param {i}: {} vs {}", got[i], p[i]);
        }
    }
    assert_eq!(opt.step_count(), 6);
    let m_got = Vec::<f32>::try_from(opt.exp_avg()).unwrap();
    let v_got = Vec::<f32>::try_from(opt.exp_avg_sq()).unwrap();
    for i in 0..10 {
        assert!((f64::from(m_got[i]) - m[i]).abs() < 1e-6);
        assert!((f64::from(v_got[i]) - v[i]).abs() < 1e-7);
    }
}

#[test]
fn restore_continues_bit_identically() {
    let cfg = AdamWConfig::default();
    let (_vs, mut a) = store();
    let mut opt_a = AdamW::new(cfg, &a);
    let mut snapshot = None;
    for step in 1..=5 {
        set_grads(&mut a, &grads_for(step));
        opt_a.step(&a, 3e-2);
        if step == 3 {
            let copy = |t: &Tensor| t.copy();
            snapshot = Some((opt_a.step_count(), copy(opt_a.exp_avg()), copy(opt_a.exp_avg_sq()), copy(a.params())));
        }
    }
    let (step, m, v, params) = snapshot.unwrap();

    let (_vs, mut b) = store();
    tch::no_grad(|| b.params().shallow_clone().copy_(&params));
    let mut opt_b = AdamW::new(cfg, &b);
    opt_b.restore(step, &m, &v);
    assert_eq!(opt_b.step_count(), 3);
    for step in 4..=5 {
        set_grads(&mut b, &grads_for(step));
        opt_b.step(&b, 3e-2);
    }
    assert!(a.params().equal(b.params()));
    assert!(opt_a.exp_avg().equal(opt_b.exp_avg()));
    assert!(opt_a.exp_avg_sq().equal(opt_b.exp_avg_sq()));
}

#[test]
#[should_panic(expected = "exp_avg has shape [3]")]
fn restore_rejects_wrong_sizes() {
    let (_vs, flat) = store();
    let mut opt = AdamW::new(AdamWConfig::default(), &flat);
    opt.restore(1, &Tensor::zeros([3], (tch::Kind::Float, Device::Cpu)), &flat.params().zeros_like());
}
