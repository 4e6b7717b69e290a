//! What only the trainer's rank 0 does in RL: serve the rollout actors (the controller), publish
//! each policy version, evaluate on the held-out prompts, and report the step's RL metrics.

use std::net::SocketAddr;
use std::time::Instant;

use rtrain_core::config::rl::{EVAL_FILE, WeightSyncChoice};
use rtrain_trainer::engine::Engine;
use rtrain_trainer::hf::HfModel;
use rtrain_trainer::runtime::JobClient;
use rtrain_trainer::{TrainContext, TrainError};

use super::eval::{EvalResult, evaluate};
use super::setup::{RlSetup, policy_channel};
use crate::reward::{RewardFn, build_reward};
use crate::rollout::actor::{CONTROLLER_ADDR, WEIGHTS_ADDR};
use crate::rollout::{RolloutController, RolloutPlan, StepRollouts};
use crate::sample::Sample;
use crate::weight_sync::{WeightPublisher, WeightServer, WeightServerConfig};

/// The gang's view of a step, for [`Coordinator::report`]: the diagnostics summed over ranks
/// (clip fraction, policy KL, entropy sum, reference-KL sum, loss tokens, value loss, behaviour
/// gap sum), and what the trainer measured.
#[derive(Clone, Copy)]
pub(super) struct StepStats<'a> {
    pub reduced: &'a [f64],
    pub mini_batches: f64,
    pub trainer_tokens_per_s: f64,
    pub with_reference: bool,
    pub value_loss: Option<f64>,
}

/// What only rank 0 does: talk to the actors, publish weights, evaluate, report.
pub(super) struct Coordinator {
    pub(super) controller: RolloutController,
    publisher: Publisher,
    job: JobClient,
    reward: Box<dyn RewardFn>,
    /// The version last published.
    published: Option<u64>,
    /// Seconds the last publication took.
    sync_seconds: f64,
    /// Bytes of one published version.
    sync_bytes: f64,
}

/// Where rank 0 publishes each policy version for the actors (`rl.weight_sync`).
enum Publisher {
    /// A shared-memory segment (made with the first version's tensors).
    Shm { channel: crate::weight_sync::ShmChannel, publisher: Option<WeightPublisher> },
    /// The chunked TCP stream, its address in the job's address book.
    Tcp(WeightServer),
}

impl Coordinator {
    pub(super) fn start(
        ctx: &TrainContext,
        setup: &RlSetup,
        model: &HfModel,
        first_step: u64,
    ) -> Result<Self, TrainError> {
        let env = rtrain_trainer::runtime::WorkerEnv::from_env().map_err(|e| TrainError::other(e.to_string()))?;
        let plan = RolloutPlan {
            first_step,
            steps: ctx.spec.steps,
            prompts_per_step: setup.rl.prompts_per_step,
            group_size: setup.rl.group_size,
            max_staleness: setup.rl.max_staleness,
            seed: ctx.spec.seed,
            prompt_count: setup.train.len(),
            trainer_attempt: ctx.attempt,
            vocab_size: usize::try_from(model.config.vocab_size()).unwrap_or(usize::MAX),
            max_response: setup.rl.max_new_tokens,
        };
        let controller = RolloutController::start(SocketAddr::from(([127, 0, 0, 1], 0)), &env.token, plan)
            .map_err(|e| TrainError::other(format!("rollout controller: {e}")))?;
        let job = JobClient::from_env().map_err(|e| TrainError::other(e.to_string()))?;
        job.publish(CONTROLLER_ADDR, &controller.addr().to_string()).map_err(|e| TrainError::other(e.to_string()))?;
        let publisher = match setup.rl.weight_sync {
            WeightSyncChoice::Shm => Publisher::Shm {
                channel: policy_channel(&env.run_id, &env.token).map_err(|e| TrainError::other(e.to_string()))?,
                publisher: None,
            },
            WeightSyncChoice::Tcp => {
                let config = WeightServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), env.token.as_bytes());
                let server =
                    WeightServer::start(config).map_err(|e| TrainError::other(format!("weight server: {e}")))?;
                job.publish(WEIGHTS_ADDR, &server.local_addr().to_string())
                    .map_err(|e| TrainError::other(e.to_string()))?;
                Publisher::Tcp(server)
            }
        };
        let reward =
            build_reward(&setup.rl.reward, ctx.device).map_err(|e| TrainError::setting("rl.reward", e.to_string()))?;
        Ok(Self { controller, publisher, job, reward, published: None, sync_seconds: 0.0, sync_bytes: 0.0 })
    }

    /// Publishes the engine's weights as policy version `version` (once per version).
    pub(super) fn publish(&mut self, engine: &Engine, version: u64) -> Result<(), TrainError> {
        if self.published == Some(version) {
            return Ok(());
        }
        let started = Instant::now();
        let weights = engine.weights()?;
        let sync = |e: crate::weight_sync::WeightSyncError| TrainError::other(format!("weight sync: {e}"));
        let generation = match &mut self.publisher {
            Publisher::Shm { channel, publisher } => {
                let publisher = match publisher {
                    Some(p) => p,
                    None => publisher.insert(WeightPublisher::create(channel, &weights.tensors).map_err(sync)?),
                };
                publisher.publish(version, &weights.tensors).map_err(sync)?;
                publisher.generation()
            }
            Publisher::Tcp(server) => {
                server.publish(version, &weights.tensors).map_err(sync)?;
                server.generation()
            }
        };
        self.published = Some(version);
        self.sync_seconds = started.elapsed().as_secs_f64();
        self.sync_bytes =
            weights.tensors.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as f64).sum::<f64>();
        self.controller.published(generation, version);
        Ok(())
    }
}

impl Coordinator {
    pub(super) fn evaluate(&mut self, model: &HfModel, setup: &RlSetup) -> Result<EvalResult, TrainError> {
        let started = Instant::now();
        let result = tch::no_grad(|| {
            evaluate(model, &setup.tokenizer, &setup.eval, self.reward.as_mut(), setup.rl.max_new_tokens)
        })
        .map_err(|e| TrainError::other(format!("held-out evaluation: {e}")))?;
        tracing::info!(accuracy = ?result.accuracy, reward = result.reward, prompts = result.prompts, seconds = started.elapsed().as_secs_f64(), "held-out evaluation");
        Ok(result)
    }

    /// Reports the step's RL metrics (metrics.jsonl, with the trainer's rank 0).
    pub(super) fn report(&self, step: u64, rollouts: &StepRollouts, stats: &StepStats<'_>) {
        let StepStats { reduced, mini_batches, trainer_tokens_per_s, with_reference, value_loss } = *stats;
        let samples: Vec<&Sample> = rollouts.groups.iter().flat_map(|g| &g.samples).collect();
        let n = samples.len().max(1) as f64;
        let rewards: Vec<f64> = samples.iter().map(|s| s.reward.total).collect();
        let mean = rewards.iter().sum::<f64>() / n;
        let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
        let correct: Vec<f64> = samples.iter().filter_map(|s| s.reward.components.get("correct").copied()).collect();
        let generated: usize = samples.iter().map(|s| s.response_token_ids.len()).sum();
        let stale: Vec<f64> = samples.iter().map(|s| step.saturating_sub(s.policy_version) as f64).collect();
        let staleness = stale.iter().sum::<f64>() / n;
        let actor_sync = rollouts.groups.iter().map(|g| g.sync_seconds).fold(0.0, f64::max);
        let mut metrics = vec![
            ("reward_mean", mean),
            ("reward_std", std),
            ("response_length", generated as f64 / n),
            ("clip_fraction", reduced[0] / mini_batches),
            ("policy_kl", reduced[1] / mini_batches),
            // The actors' and the trainer's log-probs of the same tokens under the same version:
            // ~0 unless the actors generate with other weights than the trainer's.
            ("behaviour_gap", reduced[6] / reduced[4].max(1.0)),
            ("entropy", reduced[2] / reduced[4].max(1.0)),
            ("samples", samples.len() as f64),
            ("staleness", staleness),
            ("staleness_max", stale.iter().copied().fold(0.0, f64::max)),
            ("rollout_tokens_per_s", generated as f64 / rollouts.wall_seconds.max(1e-9)),
            ("trainer_tokens_per_s", trainer_tokens_per_s),
            ("weight_publish_s", self.sync_seconds),
            ("weight_bytes", self.sync_bytes),
            ("actor_sync_s", actor_sync),
        ];
        if !correct.is_empty() {
            metrics.push(("accuracy", correct.iter().sum::<f64>() / correct.len() as f64));
        }
        if with_reference {
            metrics.push(("ref_kl", reduced[3] / reduced[4].max(1.0)));
        }
        if let Some(value_loss) = value_loss {
            metrics.push(("value_loss", value_loss));
        }
        // Best effort: a lost metric is not worth failing a step for.
        if let Err(e) = self.job.report_metrics(step + 1, &metrics) {
            tracing::warn!(error = %e, "RL metrics not reported");
        }
    }
}

/// Records held-out scores in `<run>/rl_eval.json`, keeping what is there.
pub(super) fn write_eval(
    run_dir: &std::path::Path,
    before: Option<EvalResult>,
    after: Option<EvalResult>,
) -> Result<(), TrainError> {
    let mut entries = Vec::new();
    for (key, value) in [("eval_before", before), ("eval_after", after)] {
        if let Some(v) = value {
            entries.push((key, serde_json::to_value(v).map_err(|e| TrainError::other(e.to_string()))?));
        }
    }
    crate::run_file::record(&run_dir.join(EVAL_FILE), entries)
}
