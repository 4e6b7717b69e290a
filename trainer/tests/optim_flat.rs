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

/// The gradient buffer's slice of variable `name`.
fn grad_of(flat: &FlatParams, name: &str) -> Vec<f32> {
    let entry = flat.entries().iter().find(|e| e.name == name).unwrap();
    Vec::<f32>::try_from(flat.view(flat.grads(), entry).reshape([-1])).unwrap()
}

fn values(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn layout_puts_matrices_first_each_group_latest_created_first() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = TINY.init(&vs.root());
    let flat = FlatParams::new(&vs);
    let entries = flat.entries();
    assert_eq!(entries.len(), vs.variables().len());
    assert_eq!(flat.numel(), TINY.num_params());

    let split = entries.iter().position(|e| e.shape.len() < 2).unwrap();
    assert!(entries[split..].iter().all(|e| e.shape.len() < 2));
    assert!(entries[..split].windows(2).all(|w| w[0].created > w[1].created));
    assert!(entries[split..].windows(2).all(|w| w[0].created > w[1].created));
    let mut created: Vec<usize> = entries.iter().map(|e| e.created).collect();
    created.sort();
    assert_eq!(created, (0..entries.len()).collect::<Vec<_>>());
    assert_eq!(flat.decay_numel(), entries[split].offset);
    let mut offset = 0;
    for e in entries {
        assert_eq!(e.offset, offset, "{}", e.name);
        offset += e.numel();
    }
    assert_eq!(offset, flat.numel());
    // The model builds its blocks input first, so the last block's weights lead (backward
    // finishes them first) and the token embedding, built first, comes last of its group.
    let at = |name: &str| entries.iter().position(|e| e.name == name).unwrap();
    assert!(at("transformer.h.1.attn.c_attn.weight") < at("transformer.h.0.attn.c_attn.weight"));
    assert!(at("transformer.h.1.ln_1.weight") < at("transformer.h.0.ln_1.weight"));
    assert_eq!(entries[split - 1].name, "transformer.wte.weight");
    assert_eq!(flat.params().kind(), Kind::Float);
    assert_eq!(flat.params().size(), [flat.numel()]);
}

#[test]
fn creation_order_follows_the_model_not_the_names() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    for name in ["c", "a", "b", "empty"] {
        let shape: &[i64] = if name == "empty" { &[0] } else { &[2] };
        let _ = root.var(name, shape, nn::Init::Const(1.0));
    }
    let order = rtrain_trainer::optim::flat::creation_order(&vs);
    // Zero-size variables have no storage to recognise them by: last, by name.
    assert_eq!(
        order.iter().map(|(n, &p)| (n.as_str(), p)).collect::<Vec<_>>(),
        [("a", 1), ("b", 2), ("c", 0), ("empty", 3)]
    );
    let flat = FlatParams::new(&vs);
    let names: Vec<&str> = flat.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["empty", "b", "a", "c"]);
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
    assert_eq!((grad_of(&flat, "a"), grad_of(&flat, "b")), (vec![3.0, 4.0, 5.0], vec![0.0, 0.0]));
    // The view is back: the next backward lands in the buffer.
    (&a * 1.0).sum(Kind::Float).backward();
    assert_eq!((grad_of(&flat, "a"), grad_of(&flat, "b")), (vec![4.0, 5.0, 6.0], vec![0.0, 0.0]));
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
    assert_eq!((grad_of(&flat, "a_used"), grad_of(&flat, "b_unused")), (vec![3.0; 3], vec![0.0; 2]));
    // After a step's zero_grads, a variable that gets no gradient reads zeros again.
    flat.zero_grads();
    (&used * 1.0).sum(Kind::Float).backward();
    flat.gather_grads();
    assert_eq!((grad_of(&flat, "a_used"), grad_of(&flat, "b_unused")), (vec![1.0; 3], vec![0.0; 2]));
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
