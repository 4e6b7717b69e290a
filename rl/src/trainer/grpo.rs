//! GRPO on the trainer gang: each RL step takes one batch of rollouts (rank 0 collects it from
//! the actors and broadcasts it), computes group-normalised advantages, runs `rl.ppo_epochs`
//! passes of `rl.mini_batch`-prompt optimizer steps through the engine (DDP, AdamW, clipping),
//! and rank 0 publishes the new weights to the actors.
//!
//! Loss scale: every mini-batch's normaliser counts the loss tokens (or sequences) of the whole
//! mini-batch over all ranks, and each micro-batch adds its share, so the gradient does not depend
//! on how the batch is split over ranks or micro-batches.

use std::time::{Duration, Instant};

use rtrain_core::config::rl::{EVAL_FILE, KlEstimatorChoice, KlPlacementChoice, LossAggChoice, RlAlgorithm};
use rtrain_trainer::collective::ReduceOp;
use rtrain_trainer::engine::Engine;
use rtrain_trainer::hf::HfModel;
use rtrain_trainer::sft::export_model;
use rtrain_trainer::{Fingerprint, LoopState, MicroLoss, StepOutput, TrainContext, TrainError, TrainLoop};
use tch::{Device, Kind, Tensor};

use super::critic::Critic;
use super::rank0::{Coordinator, StepStats, write_eval};
use super::setup::RlSetup;
use crate::advantages::{GroupAdvantages, GroupScale, broadcast_over_tokens, outcome_token_rewards};
use crate::aggregation::{LossAggregation, LossNormaliser};
use crate::batch::collate;
use crate::gae::Gae;
use crate::kl::{KlEstimator, KlPenalty, KlPlacement};
use crate::logits::entropy_from_logits;
use crate::masked::masked_sum;
use crate::policy_loss::{PolicyBatch, PolicyLossConfig};
use crate::rollout::StepRollouts;
use crate::sample::Sample;
use crate::value_loss::ValueLossConfig;

/// How long rank 0 waits for rollouts that make no progress.
const ROLLOUT_PATIENCE: Duration = Duration::from_secs(300);

/// The GRPO training loop of every trainer rank.
pub struct RlLoop {
    setup: RlSetup,
    model: HfModel,
    /// The starting policy, frozen, for the KL penalty (only with `rl.kl_coef > 0`).
    reference: Option<HfModel>,
    engine: Engine,
    pad: i64,
    policy_loss: PolicyLossConfig,
    kl_in_reward: Option<KlPenalty>,
    advantages: GroupAdvantages,
    /// PPO's value model; `None` for GRPO.
    critic: Option<Critic>,
    rank0: Option<Coordinator>,
}

impl RlLoop {
    pub fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let setup = RlSetup::load(&ctx.spec).map_err(|e| TrainError::other(e.to_string()))?;
        let load = |device| {
            HfModel::load(&setup.model_dir, device)
                .map_err(|source| TrainError::Model { context: "model.path", source })
        };
        let model = load(ctx.device)?;
        let reference = if setup.rl.kl_coef > 0.0 {
            let mut r = load(ctx.device)?;
            r.vs.freeze();
            Some(r)
        } else {
            None
        };
        let engine = Engine::for_job(&model.vs, ctx)?;
        let critic = match setup.rl.algorithm {
            RlAlgorithm::Ppo => Some(Critic::new(ctx, &setup.model_dir)?),
            RlAlgorithm::Grpo => None,
        };
        let pad = setup.tokenizer.pad.as_ref().or(setup.tokenizer.eos.as_ref()).map_or(0, |s| i64::from(s.id));
        let rl = &setup.rl;
        let aggregation = match rl.loss_agg {
            LossAggChoice::TokenMean => LossAggregation::TokenMean,
            LossAggChoice::SeqMeanTokenMean => LossAggregation::SeqMeanTokenMean,
            LossAggChoice::SeqMeanTokenSumNorm => {
                LossAggregation::SeqMeanTokenSumNorm { length: rl.max_new_tokens as f64 }
            }
        };
        let kl = (rl.kl_coef > 0.0).then_some(KlPenalty {
            estimator: match rl.kl_estimator {
                KlEstimatorChoice::K1 => KlEstimator::K1,
                KlEstimatorChoice::K2 => KlEstimator::K2,
                KlEstimatorChoice::K3 => KlEstimator::K3,
            },
            coef: rl.kl_coef,
            placement: match rl.kl_in {
                KlPlacementChoice::Loss => KlPlacement::Loss,
                KlPlacementChoice::Reward => KlPlacement::Reward,
            },
        });
        let policy_loss = PolicyLossConfig {
            clip_low: rl.clip_low,
            clip_high: rl.clip_high,
            dual_clip: None,
            tis_cap: rl.tis_cap,
            kl: kl.filter(|k| k.placement == KlPlacement::Loss),
            aggregation,
        };
        policy_loss.validate().map_err(|e| TrainError::setting("rl", e.to_string()))?;
        let advantages = GroupAdvantages {
            scale: if rl.scale_rewards { GroupScale::UnbiasedStd } else { GroupScale::None },
            eps: 1e-6,
        };
        Ok(Self {
            kl_in_reward: kl.filter(|k| k.placement == KlPlacement::Reward),
            setup,
            model,
            reference,
            engine,
            pad,
            policy_loss,
            advantages,
            critic,
            rank0: None,
        })
    }

    /// Rank 0's batch for `step`, broadcast to every rank: the groups in slot order.
    fn step_groups(
        &mut self,
        ctx: &mut TrainContext,
        step: u64,
    ) -> Result<(Vec<Vec<Sample>>, Option<StepRollouts>), TrainError> {
        let (bytes, rollouts) = match &mut self.rank0 {
            Some(r0) => {
                r0.publish(&self.engine, step)?;
                let rollouts =
                    r0.controller.take_step(step, ROLLOUT_PATIENCE).map_err(|e| TrainError::other(e.to_string()))?;
                let groups: Vec<&Vec<Sample>> = rollouts.groups.iter().map(|g| &g.samples).collect();
                let bytes = serde_json::to_vec(&groups).map_err(|e| TrainError::other(e.to_string()))?;
                (bytes, Some(rollouts))
            }
            None => (Vec::new(), None),
        };
        let mut len = Tensor::from_slice(&[bytes.len() as i64]);
        ctx.collective.broadcast(&mut len, 0)?;
        let len = len.int64_value(&[0]) as usize;
        let mut data = if bytes.is_empty() {
            Tensor::zeros([len as i64], (Kind::Uint8, Device::Cpu))
        } else {
            Tensor::from_slice(&bytes)
        };
        ctx.collective.broadcast(&mut data, 0)?;
        let bytes = Vec::<u8>::try_from(&data).map_err(|e| TrainError::other(e.to_string()))?;
        let groups: Vec<Vec<Sample>> =
            serde_json::from_slice(&bytes).map_err(|e| TrainError::other(format!("rollout batch: {e}")))?;
        Ok((groups, rollouts))
    }

    /// Log-probs `[B, R]` of the response tokens of `samples` under `model`, with the logits:
    /// of the distribution the actors sample from, logits / `rl.temperature` (as veRL), so the
    /// policy, the behaviour log-probs and the reference agree whatever the temperature.
    fn response_log_probs(
        &self,
        model: &HfModel,
        batch: &crate::batch::RolloutBatch,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let logits = model.logits_padded(&batch.input_ids, &batch.attention_mask).to_kind(Kind::Float)
            / self.setup.rl.temperature;
        let log_probs = batch.response_log_probs(&logits).map_err(rl_error)?;
        let r = batch.response_ids.size()[1];
        Ok((log_probs, logits.narrow(1, batch.prompt_len - 1, r)))
    }
}

/// PPO's per-token targets of one sample (response length each): whitened advantages, GAE
/// returns, and the critic's values at rollout time.
struct TokenTargets {
    advantages: Vec<f32>,
    returns: Vec<f32>,
    old_values: Vec<f32>,
}

/// Rows of different lengths right-padded with 0 into `[B, r]`.
fn pad_rows<'a>(rows: impl Iterator<Item = &'a [f32]>, r: i64, device: Device) -> Tensor {
    let mut flat = Vec::new();
    let mut b = 0;
    for row in rows {
        flat.extend_from_slice(row);
        flat.extend(std::iter::repeat_n(0.0, r as usize - row.len()));
        b += 1;
    }
    Tensor::from_slice(&flat).view([b, r]).to_device(device)
}

impl RlLoop {
    /// PPO's targets for every sample of the step, computed by every rank over the whole batch
    /// (so whitening sees the global statistics and no split changes them): the critic's values,
    /// outcome rewards on the last token (minus the KL penalty when it is placed in the reward),
    /// GAE with γ and λ, then advantage whitening.
    fn ppo_targets(
        &self,
        critic: &Critic,
        all: &[&Sample],
        micro: usize,
        device: Device,
    ) -> Result<Vec<TokenTargets>, TrainError> {
        let rl = &self.setup.rl;
        let gae = Gae { gamma: rl.gamma, lambda: rl.lam };
        let host = |t: &Tensor| {
            Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1]))
                .map_err(|e| TrainError::other(e.to_string()))
        };
        let mut targets = Vec::with_capacity(all.len());
        for chunk in all.chunks(micro) {
            let batch = collate(chunk, self.pad, Kind::Float, device).map_err(rl_error)?;
            let est = self.engine.forward(|| {
                tch::no_grad(|| -> Result<_, TrainError> {
                    let values = critic.values(&batch)?;
                    let mut rewards = outcome_token_rewards(&batch.scores, &batch.loss_mask).map_err(rl_error)?;
                    if let (Some(kl), Some(reference)) = (&self.kl_in_reward, &self.reference) {
                        let (old, _) = self.response_log_probs(&self.model, &batch)?;
                        let (ref_lp, _) = self.response_log_probs(reference, &batch)?;
                        let penalty = kl.estimator.per_token(&old, &ref_lp).map_err(rl_error)? * kl.coef;
                        rewards -= penalty * &batch.loss_mask;
                    }
                    let est = gae.estimate(&rewards, &values, &batch.loss_mask).map_err(rl_error)?;
                    Ok((est, values))
                })
            })??;
            let (est, values) = est;
            let (adv, ret, val) = (host(&est.advantages)?, host(&est.returns)?, host(&values)?);
            let r = batch.response_ids.size()[1] as usize;
            for (row, s) in chunk.iter().enumerate() {
                let n = s.response_token_ids.len();
                let cut = |v: &[f32]| v[row * r..row * r + n].to_vec();
                targets.push(TokenTargets { advantages: cut(&adv), returns: cut(&ret), old_values: cut(&val) });
            }
        }
        if rl.whiten_advantages {
            let masked: Vec<f64> = targets
                .iter()
                .zip(all)
                .flat_map(|(t, s)| {
                    t.advantages.iter().zip(&s.loss_mask).filter(|(_, m)| **m).map(|(a, _)| f64::from(*a))
                })
                .collect();
            let n = masked.len() as f64;
            if n > 1.0 {
                let mean = masked.iter().sum::<f64>() / n;
                let var = masked.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0);
                let scale = 1.0 / (var + 1e-8).sqrt();
                for (t, s) in targets.iter_mut().zip(all) {
                    for (a, m) in t.advantages.iter_mut().zip(&s.loss_mask) {
                        *a = if *m { ((f64::from(*a) - mean) * scale) as f32 } else { 0.0 };
                    }
                }
            }
        }
        Ok(targets)
    }
}

fn rl_error(e: crate::error::RlError) -> TrainError {
    TrainError::other(e.to_string())
}

/// Sums of the step's diagnostics over ranks, each a share of the global value.
#[derive(Default)]
struct Diagnostics {
    clip_fraction: f64,
    approx_kl: f64,
    /// Σ |trainer log-prob − actor log-prob| over loss tokens (before any update of the batch).
    behaviour_gap: f64,
    entropy_sum: f64,
    ref_kl_sum: f64,
    tokens: f64,
}

impl TrainLoop for RlLoop {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        let step_started = Instant::now();
        // Rank 0 starts serving the actors at the first step, when the weights (restored or
        // not) and the step training starts from are known.
        if ctx.is_rank_zero() && self.rank0.is_none() {
            self.rank0 = Some(Coordinator::start(ctx, &self.setup, &self.model, step)?);
        }
        if step == 0
            && let Some(r0) = &mut self.rank0
            && !ctx.run_dir.join(EVAL_FILE).exists()
        {
            let before = r0.evaluate(&self.model, &self.setup)?;
            write_eval(&ctx.run_dir, Some(before), None)?;
        }
        let (groups, rollouts) = self.step_groups(ctx, step)?;
        let rl = self.setup.rl.clone();
        let (world, rank) = (ctx.world_size, ctx.rank);
        // Advantages of every sample of the step (cheap, identical on every rank).
        let all: Vec<&Sample> = groups.iter().flatten().collect();
        let scores = Tensor::from_slice(&all.iter().map(|s| s.reward.total).collect::<Vec<_>>());
        let ids: Vec<u64> = all.iter().map(|s| s.group_id).collect();
        let advantages =
            Vec::<f64>::try_from(self.advantages.per_sequence(&scores.to_kind(Kind::Double), &ids).map_err(rl_error)?)
                .map_err(|e| TrainError::other(e.to_string()))?;
        let g = rl.group_size;
        let micro = ctx.spec.micro_batch.max(1);
        let ppo = match &self.critic {
            Some(critic) => Some(self.ppo_targets(critic, &all, micro, ctx.device)?),
            None => None,
        };
        let (mut loss_sum, mut tokens, mut grad_norm, mut lr) = (0.0, 0usize, None, 0.0);
        let mut value_loss_sum = 0.0;
        let mut diag = Diagnostics::default();
        // With one pass over one mini-batch the policy before the update is the current one:
        // the ratio is exactly 1 and the old log-probs need no extra forward pass.
        let single_update = rl.ppo_epochs == 1 && rl.mini_batch == rl.prompts_per_step;
        let per_rank = rl.mini_batch / world;
        let mut old_cache: std::collections::HashMap<(usize, usize), Tensor> = std::collections::HashMap::new();
        for epoch in 0..rl.ppo_epochs {
            for (m, first) in (0..rl.prompts_per_step).step_by(rl.mini_batch).enumerate() {
                let mine = first + rank * per_rank..first + (rank + 1) * per_rank;
                let mini: Vec<&Sample> = groups[first..first + rl.mini_batch].iter().flatten().collect();
                let norm = normaliser(&mini)?;
                let samples: Vec<(usize, &Sample)> = (mine.start * g..mine.end * g).map(|i| (i, all[i])).collect();
                // Every rank has as many chunks; the last one syncs the gradients during backward.
                let last_chunk = samples.len().div_ceil(micro).saturating_sub(1);
                for (c, chunk) in samples.chunks(micro).enumerate() {
                    let rows: Vec<&Sample> = chunk.iter().map(|(_, s)| *s).collect();
                    let batch = collate(&rows, self.pad, Kind::Float, ctx.device).map_err(rl_error)?;
                    let (log_probs, logits) =
                        self.engine.forward(|| self.response_log_probs(&self.model, &batch))??;
                    let key = (m, c);
                    let old = if single_update {
                        log_probs.detach()
                    } else {
                        if epoch == 0 {
                            old_cache.insert(key, log_probs.detach());
                        }
                        old_cache.get(&key).map_or_else(|| log_probs.detach(), Tensor::shallow_clone)
                    };
                    let reference = match &self.reference {
                        Some(r) => {
                            Some(self.engine.forward(|| tch::no_grad(|| self.response_log_probs(r, &batch)))??.0)
                        }
                        None => None,
                    };
                    let mut seq_adv: Vec<f64> = chunk.iter().map(|(i, _)| advantages[*i]).collect();
                    // GRPO with the KL penalty in the reward: each sequence's summed KL is
                    // subtracted from its group-normalised advantage (not before the group
                    // statistics, as veRL does), so the penalty keeps its scale `kl_coef`.
                    if let (Some(kl), Some(reference)) = (&self.kl_in_reward, &reference) {
                        let per_token = kl.estimator.per_token(&old, reference).map_err(rl_error)?;
                        let seq_kl = Vec::<f64>::try_from(
                            (&per_token * &batch.loss_mask)
                                .sum_dim_intlist(-1, false, Kind::Float)
                                .to_kind(Kind::Double),
                        )
                        .map_err(|e| TrainError::other(e.to_string()))?;
                        for (a, k) in seq_adv.iter_mut().zip(seq_kl) {
                            *a -= kl.coef * k;
                        }
                    }
                    let r = batch.response_ids.size()[1];
                    let rows = |pick: fn(&TokenTargets) -> &Vec<f32>| -> Option<Tensor> {
                        let ppo = ppo.as_ref()?;
                        Some(pad_rows(chunk.iter().map(|(i, _)| pick(&ppo[*i]).as_slice()), r, ctx.device))
                    };
                    let adv = match rows(|t| &t.advantages) {
                        Some(adv) => adv,
                        None => broadcast_over_tokens(
                            &Tensor::from_slice(&seq_adv).to_kind(Kind::Float).to_device(ctx.device),
                            &batch.loss_mask,
                        )
                        .map_err(rl_error)?,
                    };
                    let out = self
                        .policy_loss
                        .compute(
                            &PolicyBatch {
                                log_probs: &log_probs,
                                old_log_probs: &old,
                                advantages: &adv,
                                mask: &batch.loss_mask,
                                behaviour_log_probs: Some(&batch.behaviour_log_probs),
                                ref_log_probs: reference.as_ref(),
                            },
                            &norm,
                        )
                        .map_err(rl_error)?;
                    let n_tokens =
                        chunk.iter().map(|(_, s)| s.prompt_token_ids.len() + s.response_token_ids.len()).sum();
                    let policy_loss = MicroLoss::sum(out.loss).with_tokens(n_tokens);
                    if c == last_chunk {
                        self.engine.backward_and_sync(policy_loss, 1.0, ctx.collective.as_mut())?;
                    } else {
                        self.engine.backward(policy_loss, 1.0)?;
                    }
                    if let (Some(critic), Some(old_values), Some(returns)) =
                        (&mut self.critic, rows(|t| &t.old_values), rows(|t| &t.returns))
                    {
                        let values = critic.engine.forward(|| critic.values(&batch))??;
                        let config = ValueLossConfig {
                            clip: (rl.value_clip > 0.0).then_some(rl.value_clip),
                            aggregation: self.policy_loss.aggregation,
                        };
                        let vl = config
                            .compute(&values, &old_values, &returns, &batch.loss_mask, &norm)
                            .map_err(rl_error)?;
                        let value_loss = MicroLoss::sum(vl.loss * rl.vf_coef);
                        value_loss_sum += if c == last_chunk {
                            critic.engine.backward_and_sync(value_loss, 1.0, ctx.collective.as_mut())?
                        } else {
                            critic.engine.backward(value_loss, 1.0)?
                        };
                    }
                    if epoch == 0 {
                        let ent = tch::no_grad(|| entropy_from_logits(&logits.detach()));
                        diag.entropy_sum += masked_sum(&ent, &batch.loss_mask).map_err(rl_error)?.double_value(&[]);
                        diag.tokens += batch.loss_mask.sum(Kind::Double).double_value(&[]);
                        diag.clip_fraction += out.clip_fraction.double_value(&[]);
                        diag.approx_kl += out.approx_kl.double_value(&[]);
                        let gap = (&old - &batch.behaviour_log_probs).abs();
                        diag.behaviour_gap += masked_sum(&gap, &batch.loss_mask).map_err(rl_error)?.double_value(&[]);
                        if let Some(reference) = &reference {
                            let d = KlEstimator::K3.per_token(&log_probs.detach(), reference).map_err(rl_error)?;
                            diag.ref_kl_sum += masked_sum(&d, &batch.loss_mask).map_err(rl_error)?.double_value(&[]);
                        }
                    }
                }
                let out = self.engine.optimizer_step(ctx.collective.as_mut(), step)?;
                if let Some(critic) = &mut self.critic {
                    critic.engine.optimizer_step(ctx.collective.as_mut(), step)?;
                }
                loss_sum += out.loss;
                tokens += out.tokens;
                grad_norm = out.grad_norm;
                lr = out.lr;
            }
        }
        let mut reduced = Tensor::from_slice(&[
            diag.clip_fraction,
            diag.approx_kl,
            diag.entropy_sum,
            diag.ref_kl_sum,
            diag.tokens,
            value_loss_sum,
            diag.behaviour_gap,
        ]);
        ctx.collective.all_reduce(&mut reduced, ReduceOp::Sum)?;
        let r = Vec::<f64>::try_from(&reduced).map_err(|e| TrainError::other(e.to_string()))?;
        let updates = rl.updates_per_step() as f64;
        let mini_batches = (rl.prompts_per_step / rl.mini_batch) as f64;
        if let Some(r0) = &mut self.rank0 {
            r0.publish(&self.engine, step + 1)?;
            if let Some(rollouts) = rollouts {
                let train_seconds = step_started.elapsed().as_secs_f64();
                let tokens_per_s = tokens as f64 / train_seconds.max(1e-9);
                let stats = StepStats {
                    reduced: &r,
                    mini_batches,
                    trainer_tokens_per_s: tokens_per_s,
                    with_reference: self.reference.is_some(),
                    value_loss: self.critic.is_some().then(|| r[5] / mini_batches),
                };
                r0.report(step, &rollouts, &stats);
            }
        }
        Ok(StepOutput { loss: loss_sum / updates, lr, tokens, grad_norm, eval_loss: None })
    }

    fn fingerprint(&self) -> Fingerprint {
        self.model.config.architecture()
    }

    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        let mut state = self.engine.state()?;
        if let Some(critic) = &self.critic {
            critic.add_state(&mut state)?;
        }
        Ok(Some(state))
    }

    fn restore(&mut self, mut state: LoopState) -> Result<(), TrainError> {
        if let Some(critic) = &mut self.critic {
            critic.restore_from(&mut state)?;
        }
        self.engine.restore(state)
    }

    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        let Some(r0) = &mut self.rank0 else { return Ok(()) };
        r0.controller.stop();
        let after = r0.evaluate(&self.model, &self.setup)?;
        write_eval(&ctx.run_dir, None, Some(after))?;
        export_model(&self.model, &self.setup.model_dir, &ctx.run_dir.join("model"))
    }
}

/// The global loss-token and sequence counts of a mini-batch.
fn normaliser(samples: &[&Sample]) -> Result<LossNormaliser, TrainError> {
    let tokens: usize = samples.iter().map(|s| s.loss_mask.iter().filter(|m| **m).count()).sum();
    let sequences = samples.iter().filter(|s| s.loss_mask.iter().any(|m| *m)).count();
    LossNormaliser::new(tokens as f64, sequences as f64).map_err(rl_error)
}
