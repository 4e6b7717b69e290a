//! What learns from the pairs: a DPO policy beside its frozen reference, or a reward model; and
//! how a list of pairs becomes one batch for either.

use std::path::Path;

use rtrain_core::config::preference::Objective;
use rtrain_trainer::hf::{HfModel, RewardModel};
use rtrain_trainer::sft::{copy_tokenizer_files, export_model};
use rtrain_trainer::{Fingerprint, TrainError};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::data::Pair;
use super::loss::{DpoLogProbs, PairTerms, dpo_terms, response_log_probs, reward_model_terms};

/// The sequences of `n` pairs as one right-padded batch: rows `0..n` the prompts with their
/// chosen responses, rows `n..2n` with their rejected ones.
#[derive(Debug)]
pub struct PairBatch {
    /// `[2n, T]`.
    pub ids: Tensor,
    /// `[2n, T]` f32: 1 on response tokens.
    pub response: Tensor,
    /// `[2n]`: response tokens per row.
    pub response_len: Tensor,
    /// `[n]`.
    pub margin: Tensor,
    /// Each row's ids, unpadded.
    pub rows: Vec<Vec<i64>>,
}

impl PairBatch {
    pub fn new(pairs: &[&Pair], pad: i64) -> Self {
        let rows: Vec<Vec<i64>> =
            pairs.iter().map(|p| p.sequence(&p.chosen)).chain(pairs.iter().map(|p| p.sequence(&p.rejected))).collect();
        let prompt_len: Vec<usize> = pairs.iter().chain(pairs).map(|p| p.prompt.len()).collect();
        let t = rows.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = vec![pad; rows.len() * t];
        let mut response = vec![0f32; rows.len() * t];
        for (r, row) in rows.iter().enumerate() {
            ids[r * t..r * t + row.len()].copy_from_slice(row);
            response[r * t + prompt_len[r]..r * t + row.len()].fill(1.0);
        }
        let lengths: Vec<i64> = rows.iter().zip(&prompt_len).map(|(row, p)| (row.len() - p) as i64).collect();
        let shape = [rows.len() as i64, t as i64];
        Self {
            ids: Tensor::from_slice(&ids).view(shape),
            response: Tensor::from_slice(&response).view(shape),
            response_len: Tensor::from_slice(&lengths),
            margin: Tensor::from_slice(&pairs.iter().map(|p| p.margin).collect::<Vec<_>>()),
            rows,
        }
    }

    pub fn pairs(&self) -> i64 {
        self.rows.len() as i64 / 2
    }

    /// Tokens of all rows (padding excluded).
    pub fn tokens(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }
}

/// The model a preference job trains.
#[allow(clippy::large_enum_variant)] // one per process
pub enum Learner {
    Dpo {
        policy: HfModel,
        /// The starting model, frozen: the log-ratios' baseline. Training scores every pair with
        /// it once ([`Learner::reference_log_probs`]) and then lets it go.
        reference: Option<HfModel>,
        beta: f64,
        loss: rtrain_core::config::preference::DpoLossChoice,
        label_smoothing: f64,
    },
    RewardModel(RewardModel),
}

impl Learner {
    /// The learner of `objective` starting from the model folder `dir`.
    pub fn new(objective: Objective, dir: &Path, device: Device) -> Result<Self, TrainError> {
        let model_error = |source| TrainError::Model { context: "model.path", source };
        Ok(match objective {
            Objective::RewardModel => {
                Learner::RewardModel(RewardModel::from_causal_lm(dir, device).map_err(model_error)?)
            }
            Objective::Dpo { beta, loss, label_smoothing } => {
                let policy = HfModel::load(dir, device).map_err(model_error)?;
                let mut reference = HfModel::load(dir, device).map_err(model_error)?;
                reference.vs.freeze();
                Learner::Dpo { policy, reference: Some(reference), beta, loss, label_smoothing }
            }
        })
    }

    pub fn vars(&self) -> &VarStore {
        match self {
            Learner::Dpo { policy, .. } => &policy.vs,
            Learner::RewardModel(m) => m.vars(),
        }
    }

    /// The architecture and what is trained (a checkpoint of a reward model cannot resume DPO).
    pub fn fingerprint(&self) -> Fingerprint {
        let (mut f, objective) = match self {
            Learner::Dpo { policy, .. } => (policy.config.architecture(), "dpo"),
            Learner::RewardModel(m) => {
                (rtrain_trainer::hf::HfConfig::Llama(m.config().clone()).architecture(), "reward_model")
            }
        };
        f.insert("objective".into(), objective.into());
        f
    }

    /// The most tokens one sequence may have.
    pub fn max_positions(&self) -> i64 {
        match self {
            Learner::Dpo { policy, .. } => policy.config.max_positions(),
            Learner::RewardModel(m) => m.config().max_position_embeddings,
        }
    }

    /// DPO's reference log-probs of `batch`'s responses (`[2n]`, chosen rows then rejected,
    /// f32); `None` for a reward model, or once the reference is released.
    pub fn reference_log_probs(&self, batch: &PairBatch, device: Device) -> Option<Tensor> {
        let Learner::Dpo { reference: Some(reference), .. } = self else { return None };
        let ids = batch.ids.to_device(device);
        let response = batch.response.to_device(device);
        Some(tch::no_grad(|| response_log_probs(&reference.logits(&ids), &ids, &response)).to_kind(Kind::Float))
    }

    /// Lets the DPO reference model go (its log-probs are all known): its memory is freed.
    pub fn release_reference(&mut self) {
        if let Learner::Dpo { reference, .. } = self {
            *reference = None;
        }
    }

    /// The per-pair loss and rewards of `batch` (on `device`), with DPO's reference log-probs
    /// computed here by the reference model.
    pub fn terms(&self, batch: &PairBatch, device: Device) -> Result<PairTerms, TrainError> {
        self.terms_with(batch, device, None)
    }

    /// As [`Learner::terms`], DPO taking the reference log-probs (`[2n]`, as
    /// [`Learner::reference_log_probs`] gives them) from `reference` when given.
    pub fn terms_with(
        &self,
        batch: &PairBatch,
        device: Device,
        reference: Option<&Tensor>,
    ) -> Result<PairTerms, TrainError> {
        let ids = batch.ids.to_device(device);
        let n = batch.pairs();
        match self {
            Learner::Dpo { policy, beta, loss, label_smoothing, .. } => {
                let response = batch.response.to_device(device);
                let policy_lp = response_log_probs(&policy.logits(&ids), &ids, &response);
                let reference_lp = match reference.map(Tensor::shallow_clone) {
                    Some(r) => r,
                    None => self.reference_log_probs(batch, device).ok_or_else(|| {
                        TrainError::other("DPO needs the reference log-probs: the reference model was released")
                    })?,
                }
                .to_device(device)
                .to_kind(policy_lp.kind());
                let len = batch.response_len.to_device(device);
                let lp = DpoLogProbs {
                    policy_chosen: &policy_lp.narrow(0, 0, n),
                    policy_rejected: &policy_lp.narrow(0, n, n),
                    reference_chosen: &reference_lp.narrow(0, 0, n),
                    reference_rejected: &reference_lp.narrow(0, n, n),
                    chosen_len: &len.narrow(0, 0, n),
                    rejected_len: &len.narrow(0, n, n),
                };
                Ok(dpo_terms(&lp, *beta, *loss, *label_smoothing))
            }
            Learner::RewardModel(m) => {
                let read_at: Vec<i64> = batch.rows.iter().map(|r| m.read_position(r) as i64).collect();
                let scores = m.scores(&ids, &Tensor::from_slice(&read_at)).to_kind(Kind::Float);
                Ok(reward_model_terms(
                    &scores.narrow(0, 0, n),
                    &scores.narrow(0, n, n),
                    &batch.margin.to_device(device),
                ))
            }
        }
    }

    /// Writes the trained model as a Hugging Face folder `out` with the tokenizer of `tokenizer_dir`:
    /// the policy as a causal LM, a reward model as a sequence classifier.
    pub fn export(&self, tokenizer_dir: &Path, out: &Path) -> Result<(), TrainError> {
        match self {
            Learner::Dpo { policy, .. } => export_model(policy, tokenizer_dir, out),
            Learner::RewardModel(m) => {
                m.save(out, 2 << 30).map_err(|source| TrainError::Model { context: "export", source })?;
                copy_tokenizer_files(tokenizer_dir, out)?;
                tracing::info!(model = %out.display(), "reward model exported");
                Ok(())
            }
        }
    }
}
