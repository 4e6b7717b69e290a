//! Training from preference pairs (`train.trainer = "dpo"` or `"rm"`) through the same engine as
//! every built-in trainer (DDP, optimizer, checkpoints, restarts).
//!
//! The loss of a step is the mean over the global batch's pairs, whatever the split across ranks
//! and micro-batches. DPO's reference model scores every pair once, before the first step, and
//! is released; steps then run the policy alone. Each step reports, over its pairs, the accuracy (the chosen response
//! rewarded above the rejected one), the mean margin between them and each side's mean reward
//! (DPO's implicit reward β·log(π/π_ref), or the reward model's score). The held-out pairs are
//! scored the same way before the first step and after the last, into
//! `<run>/preference_eval.json` (and `summary.json`). At the end rank 0 exports `<run>/model/`:
//! the policy (DPO) or a sequence classifier transformers opens (reward model).

pub mod data;
pub mod learner;
pub mod loss;

use std::ops::Range;
use std::path::{Path, PathBuf};

use rtrain_core::config::TrainerKind;
use rtrain_core::config::preference::{EVAL_FILE, PreferenceSpec};
use rtrain_core::config::rl::EvalSet;
use rtrain_core::job_client::JobClient;
use rtrain_trainer::collective::ReduceOp;
use rtrain_trainer::data::Epochs;
use rtrain_trainer::hf::Tokenizer;
use rtrain_trainer::precision::autocast;
use rtrain_trainer::{
    Fingerprint, LoopState, MicroLoss, StepLoop, StepOutput, TrainContext, TrainError, TrainLoop, TrainStep,
};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use data::{Pair, hold_out, load_pairs};
use learner::{Learner, PairBatch};
use loss::PairTerms;

/// Running sums over pairs: count, loss, chosen-above-rejected, margin, chosen and rejected reward.
#[derive(Debug, Clone, Copy, Default)]
struct Sums([f64; 6]);

impl Sums {
    fn add(&mut self, terms: &PairTerms) {
        let f = |t: &Tensor| t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        let margin = &terms.chosen_reward - &terms.rejected_reward;
        let correct = margin.gt(0.0).to_kind(Kind::Double);
        let v = [
            terms.loss.size()[0] as f64,
            f(&terms.loss.detach()),
            f(&correct),
            f(&margin),
            f(&terms.chosen_reward),
            f(&terms.rejected_reward),
        ];
        for (s, x) in self.0.iter_mut().zip(v) {
            *s += x;
        }
    }

    /// The sums of every rank.
    fn all_reduce(self, ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let mut t = Tensor::from_slice(&self.0);
        ctx.collective.all_reduce(&mut t, ReduceOp::Sum)?;
        let v = Vec::<f64>::try_from(&t).map_err(|e| TrainError::other(e.to_string()))?;
        Ok(Self(v.try_into().map_err(|_| TrainError::other("metric sums lost their shape"))?))
    }

    fn scores(self) -> PairScores {
        let [n, loss, correct, margin, chosen, rejected] = self.0;
        let n_ = n.max(1.0);
        PairScores {
            pairs: n as u64,
            loss: loss / n_,
            accuracy: correct / n_,
            margin: margin / n_,
            chosen_reward: chosen / n_,
            rejected_reward: rejected / n_,
        }
    }
}

/// Means over a set of pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairScores {
    pub pairs: u64,
    pub loss: f64,
    /// Share of pairs whose chosen response is rewarded above the rejected one.
    pub accuracy: f64,
    /// Mean of chosen minus rejected reward.
    pub margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

impl PairScores {
    fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        [
            ("accuracy", self.accuracy),
            ("margin", self.margin),
            ("chosen_reward", self.chosen_reward),
            ("rejected_reward", self.rejected_reward),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .chain((!prefix.is_empty()).then(|| (format!("{prefix}loss"), self.loss)))
        .collect()
    }
}

/// Pairs whose DPO reference log-probs are scored together, in a fixed grouping (so each pair's
/// value is the same whatever the number of ranks that scored them).
const REFERENCE_CHUNK: usize = 32;

/// One step's pairs and loss, run by the engine.
pub struct PreferenceStep {
    learner: Learner,
    pairs: Vec<Pair>,
    /// DPO: every training pair's reference log-probs, `[pairs, 2]` (chosen, rejected).
    reference: Option<Tensor>,
    order: Epochs,
    pad: i64,
    tokenizer_dir: PathBuf,
    /// Sums over this rank's pairs of the step being trained.
    sums: Sums,
}

impl TrainStep for PreferenceStep {
    fn vars(&self) -> &VarStore {
        self.learner.vars()
    }

    fn fingerprint(&self) -> Fingerprint {
        self.learner.fingerprint()
    }

    /// Units are pairs (the default, the global batch), so the step's loss is their mean.
    fn loss(&mut self, ctx: &TrainContext, step: u64, samples: Range<usize>) -> Result<MicroLoss, TrainError> {
        let global = ctx.spec.global_batch as u64;
        let picked: Vec<usize> = samples.map(|s| self.order.example(step * global + s as u64)).collect();
        let pairs: Vec<&Pair> = picked.iter().map(|&i| &self.pairs[i]).collect();
        let batch = PairBatch::new(&pairs, self.pad);
        let reference = self.reference.as_ref().map(|table| reference_rows(table, &picked));
        let terms = self.learner.terms_with(&batch, ctx.device, reference.as_ref())?;
        self.sums.add(&terms);
        Ok(MicroLoss::sum(terms.loss.sum(Kind::Float)).with_tokens(batch.tokens()))
    }

    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        if ctx.is_rank_zero() {
            self.learner.export(&self.tokenizer_dir, &ctx.run_dir.join("model"))?;
        }
        Ok(())
    }
}

/// The preference trainer: the engine's step, the step's metrics, held-out scores.
pub struct PreferenceLoop {
    inner: StepLoop<PreferenceStep>,
    eval: Vec<Pair>,
    /// DPO: the held-out pairs' reference log-probs, as [`PreferenceStep::reference`].
    eval_reference: Option<Tensor>,
    /// Rank 0's link to the coordinator, for metrics.
    job: Option<JobClient>,
}

impl PreferenceLoop {
    pub fn new(ctx: &mut TrainContext) -> Result<Self, TrainError> {
        let TrainerKind::Preference(spec) = &ctx.spec.trainer else {
            return Err(TrainError::other("not a preference job (train.trainer = \"dpo\" or \"rm\")"));
        };
        let spec: PreferenceSpec = (**spec).clone();
        let learner = Learner::new(spec.objective, &spec.model, ctx.device)?;
        let limit = learner.max_positions() as usize;
        if spec.max_len > limit {
            return Err(TrainError::setting(
                "data.max_len",
                format!("{} exceeds the model's {limit} positions", spec.max_len),
            ));
        }
        let tokenizer =
            Tokenizer::from_dir(&spec.model).map_err(|source| TrainError::Model { context: "model.path", source })?;
        let source = match &ctx.spec.data {
            rtrain_core::config::DataSpec::File(path) => path.clone(),
            rtrain_core::config::DataSpec::Synthetic { .. } => {
                return Err(rtrain_trainer::data::DataError::NeedsFile.into());
            }
        };
        let read = |path: &Path| -> Result<Vec<Pair>, TrainError> {
            let read = load_pairs(path, &tokenizer, spec.max_len)?;
            if read.dropped > 0 {
                tracing::warn!(dropped = read.dropped, path = %path.display(), max_len = spec.max_len, "pairs with a response cut to nothing by data.max_len were dropped");
            }
            Ok(read.pairs)
        };
        let (pairs, eval) = match &spec.eval {
            EvalSet::File(path) => (read(&source)?, read(path)?),
            EvalSet::Fraction(f) => {
                hold_out(read(&source)?, *f).map_err(|m| TrainError::setting("data.eval_fraction", m))?
            }
        };
        let vocab = match &learner {
            Learner::Dpo { policy, .. } => policy.config.vocab_size(),
            Learner::RewardModel(m) => m.config().vocab_size,
        };
        if let Some(id) = pairs
            .iter()
            .chain(&eval)
            .flat_map(|p| p.prompt.iter().chain(&p.chosen).chain(&p.rejected))
            .find(|&&id| id >= vocab)
        {
            return Err(TrainError::setting(
                "data.source",
                format!(
                    "token id {id} is past the model's vocabulary of {vocab}; the tokenizer does not match model.path"
                ),
            ));
        }
        tracing::info!(train = pairs.len(), held_out = eval.len(), "preference pairs");
        let pad = tokenizer.pad.as_ref().or(tokenizer.eos.as_ref()).map_or(0, |s| i64::from(s.id));
        // DPO's reference model scores every pair once, and is then let go.
        let mut learner = learner;
        let started = std::time::Instant::now();
        let reference = reference_table(&learner, &pairs, pad, ctx)?;
        let eval_reference = reference_table(&learner, &eval, pad, ctx)?;
        if reference.is_some() {
            tracing::info!(
                pairs = pairs.len() + eval.len(),
                seconds = started.elapsed().as_secs_f64(),
                "reference log-probs computed"
            );
        }
        learner.release_reference();
        let step = PreferenceStep {
            learner,
            reference,
            order: Epochs::new(pairs.len(), ctx.spec.seed),
            pairs,
            pad,
            tokenizer_dir: spec.model.clone(),
            sums: Sums::default(),
        };
        let job = if ctx.is_rank_zero() {
            JobClient::from_env()
                .map_err(|e| tracing::warn!(error = %e, "no coordinator link; preference metrics are logged only"))
                .ok()
        } else {
            None
        };
        Ok(Self { inner: StepLoop::new(ctx, step)?, eval, eval_reference, job })
    }

    /// Scores of the held-out pairs under the current model, each rank taking every
    /// `world_size`-th pair.
    fn evaluate(&mut self, ctx: &mut TrainContext) -> Result<PairScores, TrainError> {
        let step = self.inner.train_step();
        let mine: Vec<usize> = (ctx.rank..self.eval.len()).step_by(ctx.world_size).collect();
        let mut sums = Sums::default();
        tch::no_grad(|| -> Result<(), TrainError> {
            for chunk in mine.chunks(ctx.spec.micro_batch.max(1)) {
                let pairs: Vec<&Pair> = chunk.iter().map(|&i| &self.eval[i]).collect();
                let batch = PairBatch::new(&pairs, step.pad);
                let reference = self.eval_reference.as_ref().map(|table| reference_rows(table, chunk));
                let terms = self
                    .inner
                    .engine()
                    .forward(|| step.learner.terms_with(&batch, ctx.device, reference.as_ref()))??;
                sums.add(&terms);
            }
            Ok(())
        })?;
        Ok(sums.all_reduce(ctx)?.scores())
    }

    fn report(&self, step: u64, metrics: &[(String, f64)]) {
        let Some(job) = &self.job else { return };
        let metrics: Vec<(&str, f64)> = metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        // Best effort: a lost metric is not worth failing a step for.
        if let Err(e) = job.report_metrics(step, &metrics) {
            tracing::warn!(error = %e, "preference metrics not reported");
        }
    }

    /// Scores the held-out pairs; rank 0 records them as `key` and reports them at `step`.
    fn held_out(&mut self, ctx: &mut TrainContext, key: &str, step: u64) -> Result<(), TrainError> {
        let scores = self.evaluate(ctx)?;
        tracing::info!(
            key,
            pairs = scores.pairs,
            accuracy = scores.accuracy,
            margin = scores.margin,
            loss = scores.loss,
            "held-out pairs"
        );
        if ctx.is_rank_zero() {
            write_eval(&ctx.run_dir, key, &scores)?;
            self.report(step, &scores.metrics("eval_"));
        }
        Ok(())
    }
}

impl TrainLoop for PreferenceLoop {
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError> {
        if step == 0 {
            self.held_out(ctx, "eval_before", 0)?;
        }
        self.inner.train_step_mut().sums = Sums::default();
        let out = self.inner.step(ctx, step)?;
        let sums = self.inner.train_step().sums.all_reduce(ctx)?;
        if ctx.is_rank_zero() {
            self.report(step + 1, &sums.scores().metrics(""));
        }
        Ok(out)
    }

    fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint()
    }

    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        self.inner.state()
    }

    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        self.inner.restore(state)
    }

    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        let step = ctx.spec.steps;
        self.held_out(ctx, "eval_after", step)?;
        self.inner.finish(ctx)
    }
}

/// DPO: the reference log-probs of every pair, `[pairs, 2]` (chosen, rejected) on the CPU, the
/// ranks scoring fixed chunks of [`REFERENCE_CHUNK`] pairs in turn and summing their shares;
/// `None` for a reward model.
fn reference_table(
    learner: &Learner,
    pairs: &[Pair],
    pad: i64,
    ctx: &mut TrainContext,
) -> Result<Option<Tensor>, TrainError> {
    if !matches!(learner, Learner::Dpo { .. }) {
        return Ok(None);
    }
    let mut table = Tensor::zeros([pairs.len() as i64, 2], (Kind::Float, tch::Device::Cpu));
    for (c, chunk) in pairs.chunks(REFERENCE_CHUNK).enumerate().filter(|(c, _)| c % ctx.world_size == ctx.rank) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        // In the precision the policy trains in, so that the two agree before the first step.
        let lp = autocast(ctx.spec.precision, ctx.device, || {
            learner.reference_log_probs(&PairBatch::new(&refs, pad), ctx.device)
        })?
        .ok_or_else(|| TrainError::other("the DPO reference model was released too early"))?
        .to_device(tch::Device::Cpu);
        let m = chunk.len() as i64;
        table
            .narrow(0, (c * REFERENCE_CHUNK) as i64, m)
            .copy_(&Tensor::stack(&[lp.narrow(0, 0, m), lp.narrow(0, m, m)], 1));
    }
    // Every row was filled by exactly one rank: the sum is that rank's value.
    ctx.collective.all_reduce(&mut table, ReduceOp::Sum)?;
    Ok(Some(table))
}

/// The reference log-probs of pairs `picked` as a batch of them needs them: `[2n]`, chosen
/// then rejected.
fn reference_rows(table: &Tensor, picked: &[usize]) -> Tensor {
    let rows = table.index_select(0, &Tensor::from_slice(&picked.iter().map(|&i| i as i64).collect::<Vec<_>>()));
    Tensor::cat(&[rows.select(1, 0), rows.select(1, 1)], 0)
}

/// Records held-out scores under `key` in `<run>/preference_eval.json`, keeping what is there.
fn write_eval(run_dir: &Path, key: &str, scores: &PairScores) -> Result<(), TrainError> {
    let value = serde_json::to_value(scores).map_err(|e| TrainError::other(e.to_string()))?;
    crate::run_file::record(&run_dir.join(EVAL_FILE), vec![(key, value)])
}
