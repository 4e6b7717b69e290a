//! Run with: cargo run --release --example custom_loop -- configs/custom_loop.toml
//!
//! A custom training loop on the rtrain runtime: data-parallel linear regression. The loop is a
//! model and the loss of a micro-batch (a `TrainStep`); the engine does the rest: DDP, gradient
//! accumulation, AdamW with the configured schedule, the reported loss, and checkpoints that
//! rtrain saves, resumes and restarts from like its own. The same binary is the launcher
//! (started by hand) and every worker (started by the launcher). Settings under `[user]` in the
//! config reach the loop through `ctx.spec.user`.

use std::ops::Range;
use std::process::ExitCode;

use rtrain_trainer::cli::run_with_step;
use rtrain_trainer::{MicroLoss, TrainContext, TrainError, TrainStep};
use tch::nn::{self, Module, VarStore};
use tch::{Kind, Tensor};

struct LinearRegression {
    vs: VarStore,
    model: nn::Linear,
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
            return Err(TrainError::setting("user.features", "must be at least 1"));
        }
        let vs = VarStore::new(ctx.device);
        let model = nn::linear(vs.root() / "fc", features, 1, Default::default());
        // Every rank draws the same target weights from the job seed.
        tch::manual_seed(ctx.spec.seed as i64);
        let true_weights = Tensor::randn([features, 1], (Kind::Float, ctx.device));
        Ok(Self { vs, model, true_weights, features, noise })
    }
}

impl TrainStep for LinearRegression {
    fn vars(&self) -> &VarStore {
        &self.vs
    }

    /// Mean squared error on samples `samples` of the step's global batch, which is drawn from
    /// (seed, step) alone: any split over ranks and micro-batches sees the same data.
    fn loss(&mut self, ctx: &TrainContext, step: u64, samples: Range<usize>) -> Result<MicroLoss, TrainError> {
        tch::manual_seed((ctx.spec.seed + 1_000_003 * step) as i64);
        let options = (Kind::Float, ctx.device);
        let global = ctx.spec.global_batch as i64;
        let x = Tensor::randn([global, self.features], options);
        let y = x.matmul(&self.true_weights) + Tensor::randn([global, 1], options) * self.noise;
        let (start, len) = (samples.start as i64, samples.len() as i64);
        let (x, y) = (x.narrow(0, start, len), y.narrow(0, start, len));
        let loss = self.model.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        // One "token" per sample for the throughput display.
        Ok(MicroLoss::mean(loss, samples.len()).with_tokens(samples.len()))
    }
}

fn main() -> ExitCode {
    run_with_step(LinearRegression::new)
}
