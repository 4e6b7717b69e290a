//! `[rl]`: RL post-training of a Hugging Face model (`train.trainer = "grpo"` or `"ppo"`). The
//! section expands into the job's roles: the policy trainer gang of `[train]` and a pool of
//! rollout actors (the role `rollout`, each process restarting alone).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::choice::choice;
use super::reward::{RewardSection, RewardSpec, resolve_reward};

choice!(
    /// `rl.kl_estimator`: Schulman's estimators of KL(π ‖ π_ref).
    KlEstimatorChoice, "a KL estimator", { K1 = "k1", K2 = "k2", K3 = "k3" }
);
choice!(
    /// `rl.kl_in`: where the KL penalty acts.
    KlPlacementChoice, "a KL placement", { Reward = "reward", Loss = "loss" }
);
choice!(
    /// `rl.loss_agg`: how per-token losses become one number (veRL's names).
    LossAggChoice, "a loss aggregation", {
        TokenMean = "token-mean",
        SeqMeanTokenMean = "seq-mean-token-mean",
        SeqMeanTokenSumNorm = "seq-mean-token-sum-norm"
    }
);

choice!(
    /// `rl.weight_sync`: how rollout actors receive each policy version.
    WeightSyncChoice, "a weight sync", { Shm = "shm", Tcp = "tcp" }
);

/// The name of the role that holds the rollout actors.
pub const ROLLOUT_ROLE: &str = "rollout";
/// The file in the run directory where the RL trainer records held-out scores before and after
/// training; `summary.json` carries them as `rl`.
pub const EVAL_FILE: &str = "rl_eval.json";

/// `[rl]` as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RlSection {
    /// Rollout actor processes (the role `rollout`).
    pub rollout_workers: u64,
    /// CPU cores reserved per rollout actor; fractions share a core.
    pub rollout_cpus: f64,
    /// With `train.device = "cuda"`: the actors run on the trainer's GPUs (actor i beside trainer
    /// rank i mod workers on the driver's host) instead of taking GPUs of their own, so RL fits
    /// on one GPU.
    pub colocate: bool,
    /// Restarts of single rollout actors the job allows.
    pub rollout_max_restarts: u64,
    /// Samples generated per prompt (GRPO compares them within the group).
    pub group_size: u64,
    /// Prompts per RL step (each gives `group_size` samples).
    pub prompts_per_step: u64,
    pub max_new_tokens: u64,
    pub temperature: f64,
    pub top_p: f64,
    /// 0: generate, train, sync, in turn (strictly on-policy); k > 0: generation runs up to k
    /// policy versions ahead of training, and no sample older than k versions is trained on.
    pub max_staleness: u64,
    /// `shm` (shared memory, actors on the trainer's host) or `tcp` (the authenticated chunked
    /// stream actors on other hosts need; on one host it exercises that path).
    pub weight_sync: WeightSyncChoice,
    /// KL penalty towards the starting policy; 0 turns it off (and no reference model is kept).
    pub kl_coef: f64,
    pub kl_estimator: KlEstimatorChoice,
    pub kl_in: KlPlacementChoice,
    /// PPO clipping range: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    pub clip_low: f64,
    pub clip_high: f64,
    pub loss_agg: LossAggChoice,
    /// GRPO: divide group-centred rewards by the group's standard deviation; `false` is
    /// Dr. GRPO (centring only).
    pub scale_rewards: bool,
    /// Passes over each batch.
    pub ppo_epochs: u64,
    /// Prompts per optimizer step within a batch; 0 takes the whole batch in one step.
    pub mini_batch: u64,
    /// Cap of the truncated importance weights against the actors' log-probs; 0 turns it off.
    pub tis_cap: f64,
    /// PPO: discount and GAE λ, value-loss weight and clip, advantage whitening.
    pub gamma: f64,
    pub lam: f64,
    pub vf_coef: f64,
    pub value_clip: f64,
    pub whiten_advantages: bool,
    /// Held-out prompts (JSONL like `data.source`); empty takes `eval_fraction` of the data.
    pub eval_path: String,
    pub eval_fraction: f64,
    /// Most held-out prompts scored before and after training.
    pub eval_max: u64,
    pub reward: Option<RewardSection>,
}

impl Default for RlSection {
    fn default() -> Self {
        Self {
            rollout_workers: 2,
            rollout_cpus: 0.5,
            colocate: false,
            rollout_max_restarts: 10,
            group_size: 8,
            prompts_per_step: 8,
            max_new_tokens: 32,
            temperature: 1.0,
            top_p: 1.0,
            max_staleness: 0,
            weight_sync: WeightSyncChoice::Shm,
            kl_coef: 0.0,
            kl_estimator: KlEstimatorChoice::K3,
            kl_in: KlPlacementChoice::Loss,
            clip_low: 0.2,
            clip_high: 0.28,
            loss_agg: LossAggChoice::TokenMean,
            scale_rewards: true,
            ppo_epochs: 1,
            mini_batch: 0,
            tis_cap: 2.0,
            gamma: 1.0,
            lam: 0.95,
            vf_coef: 0.5,
            value_clip: 0.2,
            whiten_advantages: true,
            eval_path: String::new(),
            eval_fraction: 0.1,
            eval_max: 200,
            reward: None,
        }
    }
}

/// The RL algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlAlgorithm {
    Grpo,
    /// PPO with a critic (a value head on the policy's architecture) and GAE.
    Ppo,
}

/// `[rl]` checked, with its numbers in the types the code uses.
#[derive(Debug, Clone, PartialEq)]
pub struct RlSpec {
    pub algorithm: RlAlgorithm,
    pub rollout_workers: usize,
    pub rollout_cpus: f64,
    /// The actors use the trainer's GPUs rather than their own.
    pub colocate: bool,
    pub rollout_max_restarts: u64,
    pub group_size: usize,
    pub prompts_per_step: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_staleness: u64,
    pub weight_sync: WeightSyncChoice,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimatorChoice,
    pub kl_in: KlPlacementChoice,
    pub clip_low: f64,
    pub clip_high: f64,
    pub loss_agg: LossAggChoice,
    pub scale_rewards: bool,
    pub ppo_epochs: usize,
    /// Prompts per optimizer step (the whole batch when `mini_batch = 0`).
    pub mini_batch: usize,
    pub tis_cap: Option<f64>,
    pub gamma: f64,
    pub lam: f64,
    pub vf_coef: f64,
    pub value_clip: f64,
    pub whiten_advantages: bool,
    pub eval: EvalSet,
    pub eval_max: usize,
    pub reward: RewardSpec,
}

/// Where the held-out examples (RL prompts, preference pairs) come from.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalSet {
    File(PathBuf),
    /// The last fraction of the training data, kept out of training.
    Fraction(f64),
}

impl RlSpec {
    /// Optimizer steps per RL step: epochs × mini-batches.
    pub fn updates_per_step(&self) -> usize {
        self.ppo_epochs * self.prompts_per_step.div_ceil(self.mini_batch)
    }
}

/// Checks `[rl]` for `algorithm` with `workers` trainer ranks; errors carry the dotted key.
pub fn resolve_rl(rl: &RlSection, algorithm: RlAlgorithm, workers: usize) -> Result<RlSpec, (String, String)> {
    let err = |key: &str, message: String| Err((format!("rl.{key}"), message));
    let count = |key: &str, v: u64, low: u64, high: u64| -> Result<usize, (String, String)> {
        if (low..=high).contains(&v) {
            Ok(v as usize)
        } else {
            Err((format!("rl.{key}"), format!("must be between {low} and {high}, got {v}")))
        }
    };
    let unit = |key: &str, v: f64, low_open: bool| -> Result<f64, (String, String)> {
        let low_ok = if low_open { v > 0.0 } else { v >= 0.0 };
        if v.is_finite() && low_ok && v <= 1.0 {
            Ok(v)
        } else {
            let low = if low_open { "above 0" } else { "from 0" };
            Err((format!("rl.{key}"), format!("must be {low} up to 1, got {v}")))
        }
    };
    let rollout_workers = count("rollout_workers", rl.rollout_workers, 1, 4096)?;
    if !(rl.rollout_cpus.is_finite() && rl.rollout_cpus > 0.0 && rl.rollout_cpus <= 1024.0) {
        return err(
            "rollout_cpus",
            format!("must be a number of cores above 0 (fractions share a core), got {}", rl.rollout_cpus),
        );
    }
    let low_group = if algorithm == RlAlgorithm::Grpo { 2 } else { 1 };
    let group_size = count("group_size", rl.group_size, low_group, 4096).map_err(|(k, m)| {
        (k, if algorithm == RlAlgorithm::Grpo { format!("{m} (GRPO compares the samples of a prompt)") } else { m })
    })?;
    let prompts_per_step = count("prompts_per_step", rl.prompts_per_step, 1, 1 << 20)?;
    if !prompts_per_step.is_multiple_of(workers) {
        return err(
            "prompts_per_step",
            format!(
                "must be a multiple of train.workers ({workers}) so every rank trains on whole groups, got {prompts_per_step}"
            ),
        );
    }
    let max_new_tokens = count("max_new_tokens", rl.max_new_tokens, 1, 1 << 16)?;
    if !(rl.temperature.is_finite() && rl.temperature > 0.0 && rl.temperature <= 100.0) {
        return err("temperature", format!("must be above 0 (sampling) and at most 100, got {}", rl.temperature));
    }
    let top_p = unit("top_p", rl.top_p, true)?;
    if rl.max_staleness > 1000 {
        return err("max_staleness", format!("must be at most 1000 versions, got {}", rl.max_staleness));
    }
    if !(rl.kl_coef.is_finite() && rl.kl_coef >= 0.0) {
        return err("kl_coef", format!("must be zero or positive, got {}", rl.kl_coef));
    }
    let clip_low = unit("clip_low", rl.clip_low, false)?;
    if clip_low >= 1.0 {
        return err("clip_low", "must be below 1".into());
    }
    if !(rl.clip_high.is_finite() && rl.clip_high >= 0.0 && rl.clip_high <= 100.0) {
        return err("clip_high", format!("must be between 0 and 100, got {}", rl.clip_high));
    }
    let ppo_epochs = count("ppo_epochs", rl.ppo_epochs, 1, 100)?;
    let mini_batch = match rl.mini_batch {
        0 => prompts_per_step,
        m if m as usize > prompts_per_step || !prompts_per_step.is_multiple_of(m as usize) => {
            return err(
                "mini_batch",
                format!("must divide rl.prompts_per_step ({prompts_per_step}), or be 0 for the whole batch; got {m}"),
            );
        }
        m if !(m as usize).is_multiple_of(workers) => {
            return err("mini_batch", format!("must be a multiple of train.workers ({workers}), got {m}"));
        }
        m => m as usize,
    };
    let tis_cap = match rl.tis_cap {
        0.0 => None,
        c if c.is_finite() && c >= 1.0 => Some(c),
        c => return err("tis_cap", format!("must be 0 (off) or at least 1, got {c}")),
    };
    let gamma = unit("gamma", rl.gamma, false)?;
    let lam = unit("lam", rl.lam, false)?;
    if !(rl.vf_coef.is_finite() && rl.vf_coef >= 0.0) {
        return err("vf_coef", format!("must be zero or positive, got {}", rl.vf_coef));
    }
    if !(rl.value_clip.is_finite() && rl.value_clip >= 0.0) {
        return err("value_clip", format!("must be zero (off) or positive, got {}", rl.value_clip));
    }
    let eval = if rl.eval_path.is_empty() {
        let f = rl.eval_fraction;
        if !(f.is_finite() && f > 0.0 && f < 1.0) {
            return err("eval_fraction", format!("must be above 0 and below 1 (or name rl.eval_path), got {f}"));
        }
        EvalSet::Fraction(f)
    } else {
        EvalSet::File(PathBuf::from(&rl.eval_path))
    };
    let eval_max = count("eval_max", rl.eval_max, 1, 1 << 20)?;
    let reward = match &rl.reward {
        Some(section) => resolve_reward(section)?,
        None => {
            return err(
                "reward",
                "name how samples are scored, e.g. [rl.reward] kind = \"numeric\" field = \"answer\"".into(),
            );
        }
    };
    Ok(RlSpec {
        algorithm,
        rollout_workers,
        rollout_cpus: rl.rollout_cpus,
        colocate: rl.colocate,
        rollout_max_restarts: rl.rollout_max_restarts.min(1_000_000),
        group_size,
        prompts_per_step,
        max_new_tokens,
        temperature: rl.temperature,
        top_p,
        max_staleness: rl.max_staleness,
        weight_sync: rl.weight_sync,
        kl_coef: rl.kl_coef,
        kl_estimator: rl.kl_estimator,
        kl_in: rl.kl_in,
        clip_low,
        clip_high: rl.clip_high,
        loss_agg: rl.loss_agg,
        scale_rewards: rl.scale_rewards,
        ppo_epochs,
        mini_batch,
        tis_cap,
        gamma,
        lam,
        vf_coef: rl.vf_coef,
        value_clip: rl.value_clip,
        whiten_advantages: rl.whiten_advantages,
        eval,
        eval_max,
        reward,
    })
}
