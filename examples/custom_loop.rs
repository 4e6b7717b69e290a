//! Run with: cargo run --release --example custom_loop -- configs/custom_loop.toml
//!
//! A custom training loop on the rtrain runtime: data-parallel linear regression. The same
//! binary is the launcher (started by hand) and every worker (started by the launcher); the
//! runtime hands each rank its collective, and the loop uses the library's DDP engine.
//! Settings under `[user]` in the config reach the loop through `ctx.spec.user`. `state` and
//! `restore` make the loop checkpointable: rtrain saves, resumes and restarts it like its own.

use std::process::ExitCode;

use rtrain_trainer::cli::run_with_loop;
use rtrain_trainer::collective::ReduceOp;
use rtrain_trainer::ddp::Ddp;
use rtrain_trainer::{LoopState, StepOutput, TrainContext, TrainError, TrainLoop};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

struct LinearRegression {
    _vs: VarStore,
    model: nn::Linear,
    ddp: Ddp,
    true_weights: Tensor,
    features: i64,
    noise: f64,
}

impl LinearRegression {
    fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let user = &ctx.spec.user;
        let features = user.get("features").and_then(|v| v.as_integer()).unwrap_or(16);
        let noise = user.get("noise").and_then(|v| v.as_float()).unwrap_or(0.01);
        if features < 1 {
            return Err(TrainError::other("user.features must be at least 1"));
        }
        let vs = VarStore::new(ctx.device);
        let model = nn::linear(vs.root() / "fc", features, 1, Default::default());
        // Every rank draws the same target weights from the job seed.
        tch::manual_seed(ctx.spec.seed as i64);
        let true_weights = Tensor::randn([features, 1], (Kind::Float, ctx.device));
        let ddp = Ddp::new(&vs, ctx.collective.as_mut(), ctx.spec.bucket_bytes)?;
        Ok(Self { _vs: vs, model, ddp, true_weights, features, noise })
    }
}

impl TrainLoop for LinearRegression {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        // Each rank's shard of the global batch comes from its own seed stream.
        tch::manual_seed((ctx.spec.seed + 1_000_003 * step + ctx.rank as u64) as i64);
        let n = ctx.spec.micro_batch as i64;
        let x = Tensor::randn([n, self.features], (Kind::Float, ctx.device));
        let y = x.matmul(&self.true_weights) + Tensor::randn([n, 1], (Kind::Float, ctx.device)) * self.noise;
        let loss = self.model.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        loss.f_backward()?;
        self.ddp.sync_grads(ctx.collective.as_mut())?;

        let lr = ctx.spec.optim.lr;
        let params = self.ddp.params_mut();
        tch::no_grad(|| {
            let mut flat = params.params().shallow_clone();
            let _ = flat.f_sub_(&(params.grads() * lr));
        });
        params.zero_grads();

        let mut global = loss.detach().reshape([1]);
        ctx.collective.all_reduce(&mut global, ReduceOp::Avg)?;
        Ok(StepOutput { loss: global.f_double_value(&[0])?, lr, tokens: ctx.spec.global_batch, grad_norm: None })
    }

    /// The weights under their variable names (plain SGD keeps no optimizer state).
    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        let flat = self.ddp.params();
        let copy = flat.params().f_to_device(Device::Cpu)?.f_detach_copy()?;
        let model = flat.entries().iter().map(|e| (e.name.clone(), flat.view(&copy, e))).collect();
        Ok(Some(LoopState { model, ..Default::default() }))
    }

    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        let flat = self.ddp.params();
        for (name, saved) in state.model {
            let entry = flat
                .entries()
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| TrainError::other(format!("unexpected tensor {name}")))?;
            let mut target = flat.view(flat.params(), entry);
            tch::no_grad(|| target.f_copy_(&saved))?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    run_with_loop(LinearRegression::new)
}
