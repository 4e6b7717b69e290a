//! The training engine: what every data-parallel step does around a model's forward pass.
//!
//! [`Engine`] owns DDP (every rank starts from rank 0's parameters; gradients are averaged in
//! buckets), gradient accumulation over micro-batches weighted by their share of the global
//! batch, global-norm clipping, AdamW with the warm-up + cosine schedule, the loss all-reduce
//! for the reported metric, and the checkpoint state of parameters and optimizer.
//!
//! A loop supplies its model and the loss of a micro-batch by implementing [`TrainStep`];
//! [`StepLoop`] makes that a [`crate::TrainLoop`] the runtime runs. A controller that drives the
//! steps itself (RL) calls [`Engine::backward`] per micro-batch, then
//! [`Engine::optimizer_step`], and exports [`Engine::weights`] for the rollout actors.

mod data_parallel;
mod state;
mod step;
mod weights;

pub use data_parallel::{Engine, EngineConfig, MicroLoss};
pub use step::{StepLoop, TrainStep};
pub use weights::{WeightVersion, Weights};
