//! The training engine's invariants, engine against engine (no stored reference values): any
//! split of a global batch into micro-batches and ranks gives the step of one big batch; a
//! checkpoint state restored into a fresh model continues bit-identically; the weight version
//! counts optimizer steps.
#![allow(clippy::unwrap_used)]

mod common;

use std::ops::Range;
use std::time::Duration;

use common::within;
use rtrain_trainer::collective::TcpCollective;
use rtrain_trainer::data::rank_samples;
use rtrain_trainer::engine::{Engine, EngineConfig, MicroLoss, WeightVersion};
use rtrain_trainer::optim::{AdamWConfig, LrSchedule};
use rtrain_trainer::precision::Precision;
use rtrain_trainer::{LoopState, StepOutput, TrainError};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Reduction, Tensor};

const GLOBAL: usize = 8;
const FEATURES: i64 = 4;
const CONNECT: Duration = Duration::from_secs(10);

const CONFIG: EngineConfig = EngineConfig {
    adamw: AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 },
    schedule: LrSchedule { base_lr: 0.05, min_lr: 0.005, warmup_steps: 1, total_steps: 4 },
    // Small enough that the first steps are clipped.
    grad_clip: 0.5,
    bucket_bytes: 16,
    precision: Precision::Fp32,
};

/// A linear model whose initial parameters are a pure function of `offset` (no global RNG:
/// tests run in parallel threads).
struct Model {
    vs: VarStore,
    fc: nn::Linear,
}

impl Model {
    fn new(offset: f64) -> Self {
        let vs = VarStore::new(Device::Cpu);
        let fc = nn::linear(vs.root() / "fc", FEATURES, 2, Default::default());
        tch::no_grad(|| {
            let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (_, mut var)) in vars.into_iter().enumerate() {
                let n = var.numel() as i64;
                let values = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7 + offset + i as f64).sin() * 0.5;
                var.copy_(&values.view(var.size().as_slice()));
            }
        });
        Self { vs, fc }
    }

    /// Mean squared error over samples `samples` of step `step`'s global batch.
    fn mse(&self, step: u64, samples: Range<usize>) -> Tensor {
        let (x, y) = batch(step);
        let (start, len) = (samples.start as i64, samples.len() as i64);
        self.fc.forward(&x.narrow(0, start, len)).mse_loss(&y.narrow(0, start, len), Reduction::Mean)
    }

    /// The same error summed over the samples (each sample's mean over its two outputs).
    fn summed_error(&self, step: u64, samples: Range<usize>) -> Tensor {
        self.mse(step, samples.clone()) * samples.len() as f64
    }
}

/// Inputs `[GLOBAL, FEATURES]` and targets `[GLOBAL, 2]` of step `step`, from a formula.
fn batch(step: u64) -> (Tensor, Tensor) {
    let n = GLOBAL as i64 * FEATURES;
    let x = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + step as f64).cos().view([GLOBAL as i64, FEATURES]);
    let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5]).view([FEATURES, 2]);
    let y = x.matmul(&w) + 0.3;
    (x, y)
}

fn single_rank() -> TcpCollective {
    TcpCollective::loopback_group(1, CONNECT).unwrap().remove(0)
}

fn flat_values(engine: &Engine) -> Vec<f32> {
    Vec::<f32>::try_from(engine.params().params()).unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
    }
}

/// Trains `steps` steps on one rank, the global batch split as `splits`; `summed` gives the
/// loss as a sum over samples instead of a mean.
fn train_split(splits: &[Range<usize>], steps: u64, summed: bool) -> (Vec<f32>, Vec<StepOutput>) {
    let model = Model::new(0.0);
    let mut comm = single_rank();
    let mut engine = Engine::new(&model.vs, &mut comm, CONFIG).unwrap();
    let mut outputs = Vec::new();
    for step in 0..steps {
        for samples in splits {
            let micro = if summed {
                MicroLoss::sum(model.summed_error(step, samples.clone()))
            } else {
                MicroLoss::mean(model.mse(step, samples.clone()), samples.len())
            };
            engine.backward(micro.with_tokens(samples.len()), GLOBAL as f64).unwrap();
        }
        outputs.push(engine.optimizer_step(&mut comm, step).unwrap());
    }
    (flat_values(&engine), outputs)
}

#[test]
fn accumulated_micro_batches_give_the_step_of_one_big_batch() {
    let (whole, want) = train_split(&[0..GLOBAL], 4, false);
    for (splits, summed) in [(vec![0..3, 3..GLOBAL], false), (vec![0..5, 5..6, 6..GLOBAL], true)] {
        let (params, got) = train_split(&splits, 4, summed);
        assert_close(&params, &whole, &format!("parameters, split {splits:?}"));
        for (g, w) in got.iter().zip(&want) {
            assert!((g.loss - w.loss).abs() <= 1e-6 * w.loss.abs().max(1.0), "loss {} vs {}", g.loss, w.loss);
            assert_eq!((g.tokens, g.lr), (GLOBAL, w.lr));
            let (gn, wn) = (g.grad_norm.unwrap(), w.grad_norm.unwrap());
            assert!((gn - wn).abs() <= 1e-5 * wn.max(1.0), "grad norm {gn} vs {wn}");
        }
    }
    assert!(want[0].grad_norm.unwrap() > CONFIG.grad_clip, "the test should exercise clipping");
}

#[test]
fn two_ranks_with_uneven_micro_batches_match_one_rank() {
    let (whole, want) = train_split(&[0..GLOBAL], 3, false);
    let ranks = within(Duration::from_secs(60), || {
        let group = TcpCollective::loopback_group(2, CONNECT).unwrap();
        let threads: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                std::thread::spawn(move || {
                    let model = Model::new(rank as f64); // rank 1's values are replaced by rank 0's
                    let mut engine = Engine::new(&model.vs, &mut comm, CONFIG).unwrap();
                    let mut outputs = Vec::new();
                    for step in 0..3 {
                        // micro 3, accumulation 2: rank 0 gets 0..3 and 6..8, rank 1 3..6 and nothing.
                        // Rank 0 syncs during its last backward, rank 1 (last micro-batch empty)
                        // in the optimizer step.
                        for m in 0..2 {
                            let samples = rank_samples(m, rank, 2, 3, GLOBAL);
                            if samples.is_empty() {
                                continue;
                            }
                            let micro = MicroLoss::mean(model.mse(step, samples.clone()), samples.len());
                            if rank == 0 && m == 1 {
                                engine.backward_and_sync(micro, GLOBAL as f64, &mut comm).unwrap();
                            } else {
                                engine.backward(micro, GLOBAL as f64).unwrap();
                            }
                        }
                        outputs.push(engine.optimizer_step(&mut comm, step).unwrap());
                    }
                    (flat_values(&engine), outputs)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
    });
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&ranks[0].0), bits(&ranks[1].0), "ranks end with identical parameters");
    assert_eq!(ranks[0].1, ranks[1].1, "ranks report the same step outputs");
    assert_close(&ranks[0].0, &whole, "parameters");
    for (g, w) in ranks[0].1.iter().zip(&want) {
        assert!((g.loss - w.loss).abs() <= 1e-6 * w.loss.abs().max(1.0), "loss {} vs {}", g.loss, w.loss);
    }
}

#[test]
fn a_backward_after_the_steps_sync_is_refused() {
    let mut comm = single_rank();
    let model = Model::new(0.0);
    let mut engine = Engine::new(&model.vs, &mut comm, CONFIG).unwrap();
    let whole = || MicroLoss::mean(model.mse(0, 0..GLOBAL), GLOBAL);
    engine.backward_and_sync(whole(), GLOBAL as f64, &mut comm).unwrap();
    let err = engine.backward(whole(), GLOBAL as f64).unwrap_err().to_string();
    assert!(err.contains("backward_and_sync") && err.contains("last micro-batch"), "{err}");
    // The step itself goes on, and the next one takes backward passes again.
    engine.optimizer_step(&mut comm, 0).unwrap();
    engine.backward(whole(), GLOBAL as f64).unwrap();
}

/// One step of the whole batch.
fn step(engine: &mut Engine, model: &Model, comm: &mut TcpCollective, step: u64) -> StepOutput {
    engine.backward(MicroLoss::mean(model.mse(step, 0..GLOBAL), GLOBAL), GLOBAL as f64).unwrap();
    engine.optimizer_step(comm, step).unwrap()
}

#[test]
fn a_restored_state_continues_bit_identically() {
    let mut comm = single_rank();
    let model = Model::new(0.0);
    let mut engine = Engine::new(&model.vs, &mut comm, CONFIG).unwrap();
    step(&mut engine, &model, &mut comm, 0);
    step(&mut engine, &model, &mut comm, 1);
    let state = engine.state().unwrap();
    let values = |state: &LoopState| -> Vec<Vec<f32>> {
        state
            .model
            .iter()
            .chain(&state.optimizer)
            .map(|(_, t)| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap())
            .collect()
    };
    let saved = values(&state);
    let want = step(&mut engine, &model, &mut comm, 2);
    assert_eq!(values(&state), saved, "the state is a copy: later steps do not change it");

    let fresh = Model::new(5.0);
    let mut restored = Engine::new(&fresh.vs, &mut comm, CONFIG).unwrap();
    assert_ne!(flat_values(&restored), flat_values(&engine));
    restored.restore(state).unwrap();
    assert_eq!(restored.version(), WeightVersion(2));
    let got = step(&mut restored, &fresh, &mut comm, 2);
    assert_eq!(got, want);
    let bits = |e: &Engine| flat_values(e).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&restored), bits(&engine), "parameters after the step that follows the restore");
}

#[test]
fn restore_refuses_the_state_of_another_model() {
    let mut comm = single_rank();
    let model = Model::new(0.0);
    let mut engine = Engine::new(&model.vs, &mut comm, CONFIG).unwrap();
    let mut state = engine.state().unwrap();
    state.model.retain(|(name, _)| name != "fc.bias");
    state.model.push(("fc.scale".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    let err = engine.restore(state).unwrap_err();
    assert!(matches!(err, TrainError::StateMismatch { file: "model.safetensors", .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("missing fc.bias") && text.contains("unexpected fc.scale"), "{text}");
}

#[test]
fn each_optimizer_step_bumps_the_weight_version_and_weights_are_copies() {
    let mut comm = single_rank();
    let model = Model::new(0.0);
    let mut engine = Engine::new(&model.vs, &mut comm, CONFIG).unwrap();
    assert_eq!(engine.version(), WeightVersion(0));
    engine.backward(MicroLoss::mean(model.mse(0, 0..GLOBAL), GLOBAL), GLOBAL as f64).unwrap();
    assert_eq!(engine.version(), WeightVersion(0), "backward alone changes no weights");
    engine.optimizer_step(&mut comm, 0).unwrap();
    assert_eq!(engine.version(), WeightVersion(1));

    let weights = engine.weights().unwrap();
    assert_eq!(weights.version, WeightVersion(1));
    let mut names: Vec<&str> = weights.tensors.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["fc.bias", "fc.weight"]);
    let live = model.vs.variables();
    let before: Vec<Vec<f32>> =
        weights.tensors.iter().map(|(_, t)| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()).collect();
    for ((name, t), values) in weights.tensors.iter().zip(&before) {
        assert_eq!(t.device(), Device::Cpu);
        assert_eq!(&Vec::<f32>::try_from(live[name].flatten(0, -1)).unwrap(), values, "{name}");
    }

    step(&mut engine, &model, &mut comm, 1);
    assert_eq!(engine.version(), WeightVersion(2));
    for ((name, t), values) in weights.tensors.iter().zip(&before) {
        assert_eq!(&Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), values, "{name}: exported weights changed");
        assert_ne!(
            &Vec::<f32>::try_from(live[name].flatten(0, -1)).unwrap(),
            values,
            "{name}: the step changed nothing"
        );
    }
}
