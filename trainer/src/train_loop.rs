//! The library surface for training loops: the runtime owns processes, rendezvous, the
//! collective, the step counter and metrics; a [`TrainLoop`] owns the model and one step.

use tch::Device;

use crate::collective::{Collective, CollectiveError};
use crate::config::JobSpec;

/// What a training loop is handed: who it is, the job, and how to talk to its peers.
pub struct TrainContext {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    /// Numbered from 0; grows with each restart of the gang.
    pub attempt: u32,
    pub device: Device,
    pub spec: JobSpec,
    pub collective: Box<dyn Collective>,
}

impl TrainContext {
    pub fn is_rank_zero(&self) -> bool {
        self.rank == 0
    }
}

/// The result of one optimizer step, as the whole gang saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// Loss averaged over the global batch (identical on every rank).
    pub loss: f64,
    pub lr: f64,
    /// Tokens processed by the whole gang in this step.
    pub tokens: usize,
    /// Global gradient norm before clipping, if the loop computes it.
    pub grad_norm: Option<f64>,
}

/// An error that ends the worker; the runtime reports it to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    pub fn other(message: impl Into<String>) -> Self {
        TrainError::Other(message.into())
    }
}

/// A data-parallel training loop. Every rank runs one instance; `step` is called for
/// `step = 0 .. spec.steps` and must take part in the same collectives on every rank.
pub trait TrainLoop {
    /// Runs one optimizer step (including gradient accumulation and synchronisation).
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError>;
}
