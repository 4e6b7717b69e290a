//! Run with: cargo run --release --example roles -- configs/roles_demo.toml
//!
//! A job of two roles. The trainer gang (this binary, 2 ranks) learns a linear model from
//! samples it does not make: each rank opens a TCP port, publishes it in the job's address book
//! as "data", and trains on what arrives there. The actors (`examples/roles/actor.py`, plain
//! Python) look the trainer up through the coordinator's HTTP endpoint and stream samples to
//! every rank. An actor that dies is restarted by itself; the trainer does not notice.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::ops::Range;
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::Duration;

use rtrain_trainer::cli::run_with_step;
use rtrain_trainer::runtime::JobClient;
use rtrain_trainer::{MicroLoss, TrainContext, TrainError, TrainStep};
use tch::Tensor;
use tch::nn::{self, Module, VarStore};

/// How long a micro-batch waits for samples before the rank gives up.
const NO_DATA_AFTER: Duration = Duration::from_secs(60);

/// One sample as the actors send it: a JSON line `{"x": [...], "y": 1.5}`.
#[derive(serde::Deserialize)]
struct Sample {
    x: Vec<f32>,
    y: f32,
}

/// A linear model and the samples the actors stream to this rank; the engine does the rest
/// (DDP, the optimizer and its schedule, checkpoints).
struct FedByActors {
    vs: VarStore,
    model: nn::Linear,
    samples: Receiver<Sample>,
    features: usize,
    job: JobClient,
    received: u64,
}

impl FedByActors {
    fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let features = ctx.spec.user.get("features").and_then(|v| v.as_integer()).unwrap_or(8);
        if !(1..=1024).contains(&features) {
            return Err(TrainError::setting("user.features", "must be between 1 and 1024"));
        }
        let features = features as usize;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| TrainError::other(format!("data port: {e}")))?;
        let addr = listener.local_addr().map_err(|e| TrainError::other(format!("data port: {e}")))?;
        // Bounded: a full buffer stops reading, and TCP's flow control slows the actors down.
        let (tx, samples) = sync_channel(4096);
        std::thread::spawn(move || accept_samples(listener, tx, features));
        let job = JobClient::from_env().map_err(|e| TrainError::other(e.to_string()))?;
        job.publish("data", &addr.to_string()).map_err(|e| TrainError::other(e.to_string()))?;
        let vs = VarStore::new(ctx.device);
        let model = nn::linear(vs.root() / "fc", features as i64, 1, Default::default());
        Ok(Self { vs, model, samples, features, job, received: 0 })
    }

    /// `n` samples, as the actors deliver them.
    fn batch(&mut self, n: usize) -> Result<(Tensor, Tensor), TrainError> {
        let (mut xs, mut ys) = (Vec::with_capacity(n * self.features), Vec::with_capacity(n));
        while ys.len() < n {
            match self.samples.recv_timeout(NO_DATA_AFTER) {
                Ok(s) => {
                    xs.extend(s.x);
                    ys.push(s.y);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(TrainError::other(format!("no samples from the actors for {NO_DATA_AFTER:?}")));
                }
            }
        }
        self.received += n as u64;
        Ok((
            Tensor::from_slice(&xs).view([n as i64, self.features as i64]),
            Tensor::from_slice(&ys).view([n as i64, 1]),
        ))
    }
}

/// Reads samples from every connection (actors come and go) until the trainer is done.
fn accept_samples(listener: TcpListener, samples: SyncSender<Sample>, features: usize) {
    for stream in listener.incoming().flatten() {
        let samples = samples.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                // A malformed sample is dropped, not trained on.
                match serde_json::from_str::<Sample>(&line) {
                    Ok(s) if s.x.len() == features && s.y.is_finite() && s.x.iter().all(|v| v.is_finite()) => {
                        if samples.send(s).is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
    }
}

impl TrainStep for FedByActors {
    fn vars(&self) -> &VarStore {
        &self.vs
    }

    /// Mean squared error on the next samples to arrive (the data comes from the actors, so a
    /// resumed run does not replay the same batches).
    fn loss(&mut self, ctx: &TrainContext, step: u64, samples: Range<usize>) -> Result<MicroLoss, TrainError> {
        let (x, y) = self.batch(samples.len())?;
        let loss =
            self.model.forward(&x.to_device(ctx.device)).mse_loss(&y.to_device(ctx.device), tch::Reduction::Mean);
        // Best effort: a lost metric is not worth failing a step for.
        let _ = self.job.report_metrics(step + 1, &[("samples_received", self.received as f64)]);
        Ok(MicroLoss::mean(loss, samples.len()).with_tokens(samples.len()))
    }
}

fn main() -> ExitCode {
    run_with_step(FedByActors::new)
}
