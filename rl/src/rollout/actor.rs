//! The rollout actor: the built-in program of the `rollout` role (`rtrain-worker role rollout`).
//!
//! It loads the policy's model folder (on the job's device: CPU, or a GPU of its own), finds the trainer's rollout controller through the job's
//! address book, and then loops: ask for prompts, bring its weights up to the version the work
//! needs (through shared memory from the trainer), generate `rl.group_size` samples per prompt,
//! score them and hand them in. When the trainer restarts, the connection breaks: the actor looks
//! the new controller up and goes on with the restored weights. When the actor dies, the launcher
//! restarts it alone and the controller gives its unfinished prompts to another.

use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rtrain_core::config::rl::{ROLLOUT_ROLE, RlSpec, WeightSyncChoice};
use rtrain_core::config::{DeviceKind, JobSpec, TRAINING_ROLE, TrainerKind};
use rtrain_core::contract::WorkerEnv;
use rtrain_core::job_client::JobClient;
use rtrain_trainer::hf::{HfModel, SamplingParams, Tokenizer, generate_groups};
use tch::{Device, Tensor};

use super::wire::{Conn, FromActor, GroupResult, ToActor, WireError, WorkItem, proof};
use crate::prompts::Prompt;
use crate::reward::{RewardFn, RewardInput, build_reward};
use crate::sample::{FinishReason, Reward, Sample};
use crate::trainer::{RlSetup, policy_channel};
use crate::weight_sync::{SyncOutcome, SyncedVersion, WeightClient, WeightSubscriber};

/// The address name under which the trainer's rank 0 publishes its controller.
pub const CONTROLLER_ADDR: &str = "rollout";
/// The address name of rank 0's weight server (`rl.weight_sync = "tcp"`).
pub const WEIGHTS_ADDR: &str = "weights";
/// How long an actor waits for the weights a work item needs.
const WEIGHTS_PATIENCE: Duration = Duration::from_secs(300);

/// Errors that end an actor (the launcher restarts it).
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("{0}")]
    Setup(String),
    #[error("rollout controller: {0}")]
    Wire(#[from] WireError),
    #[error("weights: {0}")]
    Weights(String),
    #[error("generation: {0}")]
    Generate(String),
    #[error("reward: {0}")]
    Reward(String),
}

/// `rtrain-worker role rollout`.
pub fn main() -> ExitCode {
    rtrain_trainer::runtime::init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "rollout actor failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Actor {
    env: WorkerEnv,
    rl: RlSpec,
    model: HfModel,
    vars: Vec<(String, Tensor)>,
    tokenizer: Tokenizer,
    prompts: Vec<Prompt>,
    reward: Box<dyn RewardFn>,
    weights: WeightSource,
    job: JobClient,
}

/// Where an actor reads policy versions from (`rl.weight_sync`).
enum WeightSource {
    Shm(WeightSubscriber),
    /// Rank 0's weight server, found in the address book (again after a trainer restart), and
    /// the version held.
    Tcp {
        client: Option<WeightClient>,
        held: Option<SyncedVersion>,
        token: String,
    },
}

fn run() -> Result<(), ActorError> {
    let env = WorkerEnv::from_env().map_err(|e| ActorError::Setup(e.to_string()))?;
    let spec: JobSpec = rtrain_core::config::load(&env.config, &[]).map_err(|e| ActorError::Setup(e.to_string()))?.spec;
    let TrainerKind::Rl { model, .. } = &spec.trainer else {
        return Err(ActorError::Setup(format!("the {ROLLOUT_ROLE} program feeds an RL trainer; this job has none")));
    };
    let device = actor_device(&spec)?;
    let setup = RlSetup::load(&spec).map_err(|e| ActorError::Setup(e.to_string()))?;
    let mut loaded = HfModel::load(model, device).map_err(|e| ActorError::Setup(e.to_string()))?;
    loaded.vs.freeze();
    let mut vars: Vec<(String, Tensor)> = loaded.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = match setup.rl.weight_sync {
        WeightSyncChoice::Shm => WeightSource::Shm(WeightSubscriber::new(
            &policy_channel(&env.run_id, &env.token).map_err(|e| ActorError::Setup(e.to_string()))?,
        )),
        WeightSyncChoice::Tcp => WeightSource::Tcp { client: None, held: None, token: env.token.clone() },
    };
    let reward = build_reward(&setup.rl.reward, device).map_err(|e| ActorError::Setup(e.to_string()))?;
    let job = JobClient::from_env().map_err(|e| ActorError::Setup(e.to_string()))?;
    let mut actor = Actor {
        rl: setup.rl,
        model: loaded,
        vars,
        tokenizer: setup.tokenizer,
        prompts: setup.train,
        reward,
        weights,
        job,
        env,
    };
    tracing::info!(actor = actor.env.rank, prompts = actor.prompts.len(), "rollout actor ready");
    loop {
        let addr = actor.find_controller()?;
        match actor.serve(addr) {
            Ok(()) => return Ok(()),
            // The trainer went away (restart) or the connection broke: find it again.
            Err(ActorError::Wire(e)) => {
                tracing::info!(error = %e, "lost the rollout controller; looking it up again");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Where the actor generates: on the job's `train.device`. On CUDA the launcher gives each actor
/// its own GPU (`CUDA_VISIBLE_DEVICES` lists it alone, so it is device 0), libtorch's CUDA backend
/// is loaded before any other tch call, and float32 matmuls follow `train.tf32` as the trainer's
/// do, so that both compute the policy's log-probs alike.
fn actor_device(spec: &JobSpec) -> Result<Device, ActorError> {
    match spec.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => {
            rtrain_trainer::cuda::require_cuda(0).map_err(|e| ActorError::Setup(e.to_string()))?;
            rtrain_trainer::precision::set_tf32(spec.tf32).map_err(|e| ActorError::Setup(e.to_string()))?;
            Ok(Device::Cuda(0))
        }
    }
}

/// A client of rank 0's weight server, once its address is in the job's address book.
fn weight_server(job: &JobClient, token: &str) -> Option<WeightClient> {
    let book = job.lookup(TRAINING_ROLE).ok()?;
    let addr: SocketAddr = book.addr(TRAINING_ROLE, 0, WEIGHTS_ADDR)?.parse().ok()?;
    Some(WeightClient::new(addr, token.as_bytes()))
}

impl Actor {
    /// The controller's address, once the trainer's rank 0 has published it.
    fn find_controller(&self) -> Result<SocketAddr, ActorError> {
        let started = Instant::now();
        loop {
            match self.job.lookup(TRAINING_ROLE) {
                Ok(book) => {
                    if let Some(addr) = book.addr(TRAINING_ROLE, 0, CONTROLLER_ADDR)
                        && let Ok(addr) = addr.parse()
                    {
                        return Ok(addr);
                    }
                }
                Err(e) if started.elapsed() > Duration::from_secs(600) => {
                    return Err(ActorError::Setup(format!("cannot reach the coordinator: {e}")));
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Works for the controller at `addr` until it says stop (`Ok`) or the connection fails.
    fn serve(&mut self, addr: SocketAddr) -> Result<(), ActorError> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(WireError::from)?;
        let mut conn = Conn::new(stream).map_err(WireError::from)?;
        let ToActor::Challenge { nonce } = conn.recv()? else {
            return Err(WireError::Malformed("expected a challenge".into()).into());
        };
        let hello = FromActor::Hello {
            rank: self.env.rank as u32,
            attempt: self.env.attempt,
            proof: proof(&self.env.token, &nonce),
        };
        conn.send(&hello)?;
        let ToActor::Welcome { trainer_attempt } = conn.recv()? else {
            return Err(WireError::Malformed("expected a welcome".into()).into());
        };
        tracing::info!(%addr, trainer_attempt, "connected to the rollout controller");
        // Enough prompts per request to keep generation batched, but a share of a step only, so
        // every actor gets some.
        let max = self.rl.prompts_per_step.div_ceil(self.rl.rollout_workers).max(1);
        loop {
            conn.send(&FromActor::Want { max })?;
            match conn.recv()? {
                ToActor::Work { items, generation, min_version } => {
                    let sync_started = Instant::now();
                    let held = self.sync_weights(generation, min_version)?;
                    let sync_seconds = sync_started.elapsed().as_secs_f64();
                    let results = self.generate(&items, held, sync_seconds)?;
                    for result in results {
                        conn.send(&FromActor::Done(result))?;
                        match conn.recv()? {
                            ToActor::Accepted => {}
                            ToActor::Rejected { reason } => tracing::warn!(%reason, "samples refused"),
                            other => return Err(WireError::Malformed(format!("unexpected {other:?}")).into()),
                        }
                    }
                }
                ToActor::Wait { ms } => std::thread::sleep(Duration::from_millis(ms.min(1000))),
                ToActor::Stop => {
                    tracing::info!("training is over");
                    return Ok(());
                }
                other => return Err(WireError::Malformed(format!("unexpected {other:?}")).into()),
            }
        }
    }

    /// Loads new weights until they are of `generation` and at least `min_version`.
    fn sync_weights(&mut self, generation: u64, min_version: u64) -> Result<SyncedVersion, ActorError> {
        let started = Instant::now();
        loop {
            let synced = match &mut self.weights {
                WeightSource::Shm(subscriber) => subscriber.sync_into(&mut self.vars),
                WeightSource::Tcp { client, held, token } => {
                    if client.is_none() {
                        *client = weight_server(&self.job, token);
                    }
                    match client {
                        Some(c) => {
                            let synced = c.fetch_into(*held, &mut self.vars);
                            match &synced {
                                Ok(SyncOutcome::Loaded { version, .. } | SyncOutcome::UpToDate(version)) => {
                                    *held = Some(*version);
                                }
                                // The server may have moved (a restarted trainer): look it up again.
                                Err(_) => {
                                    *client = None;
                                    // A transfer cut short leaves a mix of versions: load whole next time.
                                    *held = None;
                                }
                                Ok(SyncOutcome::NotPublished) => {}
                            }
                            synced
                        }
                        None => Ok(SyncOutcome::NotPublished),
                    }
                }
            };
            let held = match synced {
                Ok(SyncOutcome::Loaded { version, .. } | SyncOutcome::UpToDate(version)) => Some(version),
                Ok(SyncOutcome::NotPublished) => None,
                Err(e) if e.is_retryable() => None,
                Err(e) => return Err(ActorError::Weights(e.to_string())),
            };
            if let Some(v) = held
                && v.generation == generation
                && v.version >= min_version
            {
                return Ok(v);
            }
            if started.elapsed() > WEIGHTS_PATIENCE {
                return Err(ActorError::Weights(format!(
                    "no weights of version {min_version} (publisher generation {generation}) after {WEIGHTS_PATIENCE:?}; holding {held:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Generates and scores the groups of `items` in one batch.
    fn generate(
        &mut self,
        items: &[WorkItem],
        held: SyncedVersion,
        sync_seconds: f64,
    ) -> Result<Vec<GroupResult>, ActorError> {
        let started = Instant::now();
        let g = self.rl.group_size;
        let mut prompts = Vec::with_capacity(items.len());
        for item in items {
            let prompt = self.prompts.get(item.prompt).ok_or_else(|| {
                ActorError::Setup(format!(
                    "prompt {} asked for, {} known: do trainer and actors read the same data?",
                    item.prompt,
                    self.prompts.len()
                ))
            })?;
            prompts.push(prompt.token_ids.clone());
        }
        let params = SamplingParams {
            max_new_tokens: self.rl.max_new_tokens,
            temperature: self.rl.temperature,
            top_p: self.rl.top_p,
            seed: items.first().map_or(0, |i| i.seed),
            // The behaviour policy is the distribution sampled from: the tempered one.
            logprobs_at_temperature: true,
            ..SamplingParams::default()
        };
        // The group_size samples of a prompt share its prefill (its KV cache is computed once).
        let generations: Vec<_> = generate_groups(&self.model, &self.tokenizer, &prompts, g, &params)
            .map_err(|e| ActorError::Generate(e.to_string()))?
            .into_iter()
            .flatten()
            .collect();
        let inputs: Vec<RewardInput<'_>> = generations
            .iter()
            .enumerate()
            .map(|(i, out)| {
                let prompt = &self.prompts[items[i / g].prompt];
                RewardInput {
                    prompt: &prompt.text,
                    response: &out.text,
                    record: &prompt.record,
                    ended: out.finish_reason == rtrain_trainer::hf::FinishReason::Stop,
                }
            })
            .collect();
        let scores = self.reward.score(&inputs).map_err(|e| ActorError::Reward(e.to_string()))?;
        let gen_seconds = started.elapsed().as_secs_f64() / items.len() as f64;
        let mut results = Vec::with_capacity(items.len());
        let mut scored = generations.into_iter().zip(scores);
        for item in items {
            let prompt = &self.prompts[item.prompt];
            let samples = scored
                .by_ref()
                .take(g)
                .map(|(out, score)| {
                    let mut reward = Reward { total: score.reward, components: Default::default() };
                    if let Some(correct) = score.correct {
                        reward.components.insert("correct".into(), f64::from(u8::from(correct)));
                    }
                    Sample {
                        prompt_id: prompt.id.clone(),
                        group_id: item.id,
                        prompt_token_ids: prompt.token_ids.clone(),
                        loss_mask: vec![true; out.token_ids.len()],
                        behaviour_log_probs: out.logprobs.iter().map(|&l| l as f32).collect(),
                        response_token_ids: out.token_ids,
                        policy_version: held.version,
                        reward,
                        finish_reason: match out.finish_reason {
                            rtrain_trainer::hf::FinishReason::Stop => FinishReason::Stop,
                            rtrain_trainer::hf::FinishReason::Length => FinishReason::Length,
                        },
                    }
                })
                .collect();
            results.push(GroupResult { id: item.id, samples, gen_seconds, sync_seconds, actor: self.env.rank as u32 });
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(device: &str) -> JobSpec {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, format!("[train]\ndevice = \"{device}\"\n")).unwrap();
        rtrain_core::config::load(&path, &[]).unwrap().spec
    }

    #[test]
    fn actors_generate_on_the_jobs_device() {
        assert_eq!(actor_device(&spec("cpu")).unwrap(), Device::Cpu);
        // On a machine with a GPU and PyTorch's CUDA libraries the actor takes its GPU; elsewhere
        // it stops with what is missing.
        match actor_device(&spec("cuda")) {
            Ok(device) => assert_eq!(device, Device::Cuda(0)),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("CUDA") && e.contains("train.device = \"cpu\""), "{e}");
            }
        }
    }
}
