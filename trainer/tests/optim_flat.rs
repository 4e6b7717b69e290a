//! FlatParams: layout, variables as views of the flat buffer, autograd through the views, gradient
//! gathering and clipping.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use rtrain_trainer::model::GptConfig;
use rtrain_trainer::optim::FlatParams;
use tch::{Device, Kind, Tensor, nn};

const TINY: GptConfig = GptConfig { vocab_size: 256, n_ctx: 16, n_layer: 2, n_head: 2, n_embd: 32 };

fn batch() -> (Tensor, Tensor) {
    let x = Tensor::randint(256, [2, 16], (Kind::Int64, Device::Cpu));
    let y = Tensor::randint(256, [2, 16], (Kind::Int64, Device::Cpu));
    (x, y)
}

fn values(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn layout_puts_matrices_first_sorted_by_name() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = TINY.init(&vs.root());
    let flat = FlatParams::new(&vs);
    let entries = flat.entries();
    assert_eq!(entries.len(), vs.variables().len());
    assert_eq!(flat.numel(), TINY.num_params());

    let split = entries.iter().position(|e| e.shape.len() < 2).unwrap();
    assert!(entries[split..].iter().all(|e| e.shape.len() < 2));
    assert!(entries[..split].windows(2).all(|w| w[0].name < w[1].name));
    assert!(entries[split..].windows(2).all(|w| w[0].name < w[1].name));
    assert_eq!(flat.decay_numel(), entries[split].offset);
    let mut offset = 0;
    for e in entries {
        assert_eq!(e.offset, offset, "{}", e.name);
        offset += e.numel();
    }
    assert_eq!(offset, flat.numel());
    assert_eq!(entries[0].name, "transformer.h.0.attn.c_attn.weight");
    assert_eq!(flat.params().kind(), Kind::Float);
    assert_eq!(flat.params().size(), [flat.numel()]);
}

#[test]
fn rehoming_keeps_values_and_variables_alias_the_buffer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = TINY.init(&vs.root());
    let (x, _) = batch();
    let before_vals = values(&vs);
    let before_logits = tch::no_grad(|| model.forward(&x));

    let flat = FlatParams::new(&vs);
    for ((name, old), (_, new)) in before_vals.iter().zip(values(&vs)) {
        assert!(old.equal(&new), "{name} changed when re-homed");
    }
    let vars = vs.variables();
    for e in flat.entries() {
        assert!(flat.view(flat.params(), e).equal(&vars[&e.name]), "{}", e.name);
        assert!(vars[&e.name].requires_grad(), "{} lost requires_grad", e.name);
    }
    assert!(tch::no_grad(|| model.forward(&x)).equal(&before_logits));

    // Writing the flat buffer under no_grad changes the model's variables and output.
    tch::no_grad(|| {
        let _ = flat.params().shallow_clone().g_mul_scalar_(2.0);
    });
    for ((name, old), (_, new)) in before_vals.iter().zip(values(&vs)) {
        assert!((old * 2.0).equal(&new), "{name} is not a view of the flat buffer");
    }
    let after = tch::no_grad(|| model.forward(&x));
    assert!(!after.equal(&before_logits));
}

#[test]
fn autograd_flows_through_views_and_accumulates_into_the_buffer() {
    tch::manual_seed(1);
    let (x, y) = batch();
    // Two identical models: one re-homed, one left alone.
    let plain_vs = nn::VarStore::new(Device::Cpu);
    let plain = TINY.init(&plain_vs.root());
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = TINY.init(&vs.root());
    vs.copy(&plain_vs).unwrap();
    let mut flat = FlatParams::new(&vs);

    plain.loss(&x, &y).backward();
    model.loss(&x, &y).backward();
    flat.gather_grads();
    let plain_vars = plain_vs.variables();
    for e in flat.entries() {
        let want = plain_vars[&e.name].grad();
        let got = flat.view(flat.grads(), e);
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{}: grad differs by {diff}", e.name);
        assert!(want.abs().max().double_value(&[]) > 0.0, "{} has a zero grad", e.name);
    }

    // The variables' .grad tensors are the buffer's slices: a second backward accumulates into
    // the buffer itself, and zero_grads resets what the variables see.
    let doubled = flat.grads() * 2.0;
    model.loss(&x, &y).backward();
    assert!((flat.grads() - &doubled).abs().max().double_value(&[]) < 1e-6);
    flat.gather_grads();
    assert!((flat.grads() - doubled).abs().max().double_value(&[]) < 1e-6);
    flat.zero_grads();
    let mut vars = vs.variables();
    assert!(vars.values().all(|v| v.grad().abs().max().double_value(&[]) == 0.0));
    // The usual way of zeroing a variable's gradient (detach_, then zero_) works on the views and
    // reaches the buffer.
    model.loss(&x, &y).backward();
    vars.values_mut().for_each(Tensor::zero_grad);
    assert_eq!(flat.grads().abs().max().double_value(&[]), 0.0);
    flat.gather_grads();
    assert_eq!(flat.grads().abs().max().double_value(&[]), 0.0);
}

#[test]
fn a_replaced_grad_is_gathered_and_the_view_put_back() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let mut a = root.var("a", &[3], nn::Init::Const(1.0));
    let _b = root.var("b", &[2], nn::Init::Const(1.0));
    let mut flat = FlatParams::new(&vs);
    // Code of its own gives `a` a separate .grad tensor.
    rtrain_trainer::torch_extras::set_grad(&mut a, &Tensor::from_slice(&[1.0f32, 2.0, 3.0])).unwrap();
    (&a * 2.0).sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), [0.0; 5], "the buffer saw a detached grad");
    flat.gather_grads();
    assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), [3.0, 4.0, 5.0, 0.0, 0.0]);
    // The view is back: the next backward lands in the buffer.
    (&a * 1.0).sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), [4.0, 5.0, 6.0, 0.0, 0.0]);
    // A mismatched tensor is refused with a reason.
    let e =
        rtrain_trainer::torch_extras::set_grad(&mut a, &Tensor::zeros([2], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(e.contains("shape"), "{e}");
}

#[test]
fn gather_writes_zeros_for_variables_without_grad() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let used = root.var("a_used", &[3], nn::Init::Const(1.0));
    let _unused = root.var("b_unused", &[2], nn::Init::Const(1.0));
    let mut flat = FlatParams::new(&vs);
    (&used * 3.0).sum(Kind::Float).backward();
    flat.gather_grads();
    assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), [3.0, 3.0, 3.0, 0.0, 0.0]);
    // After a step's zero_grads, a variable that gets no gradient reads zeros again.
    flat.zero_grads();
    (&used * 1.0).sum(Kind::Float).backward();
    flat.gather_grads();
    assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), [1.0, 1.0, 1.0, 0.0, 0.0]);
    assert_eq!(flat.decay_numel(), 0);
}

#[test]
fn clip_scales_only_above_max_and_returns_the_pre_clip_norm() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _w = vs.root().var("w", &[2, 2], nn::Init::Const(0.0));
    let mut flat = FlatParams::new(&vs);
    flat.grads_mut().copy_(&Tensor::from_slice(&[3.0f32, 0.0, 4.0, 0.0]));

    assert!((flat.clip_grad_norm(10.0) - 5.0).abs() < 1e-6);
    assert_eq!(Vec::<f32>::try_from(flat.grads()).unwrap(), [3.0, 0.0, 4.0, 0.0]);

    assert!((flat.clip_grad_norm(1.0) - 5.0).abs() < 1e-6);
    let clipped = Vec::<f32>::try_from(flat.grads()).unwrap();
    // torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6).
    let coef = 1.0 / (5.0 + 1e-6);
    assert!((f64::from(clipped[0]) - 3.0 * coef).abs() < 1e-6);
    assert!((f64::from(clipped[2]) - 4.0 * coef).abs() < 1e-6);
}

#[test]
fn varstore_save_and_load_go_through_the_views() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _model = TINY.init(&vs.root());
    let flat = FlatParams::new(&vs);
    vs.save(&path).unwrap();
    let saved = flat.params().copy();

    tch::no_grad(|| {
        let _ = flat.params().shallow_clone().zero_();
    });
    vs.load(&path).unwrap();
    assert!(flat.params().equal(&saved), "load did not write into the flat buffer");
}
