//! What the RL trainer and its rollout actors both read from the job: the settings, the
//! tokenizer, the training and held-out prompts, and the name of the weight channel.

use std::path::PathBuf;

use rtrain_core::config::rl::{EvalSet, RlSpec};
use rtrain_core::config::{DataSpec, JobSpec, TrainerKind};
use rtrain_trainer::hf::Tokenizer;
use sha2::{Digest, Sha256};

use crate::prompts::{Prompt, PromptError, load_prompts, split_held_out};
use crate::weight_sync::{ShmChannel, WeightSyncError};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("this job has no RL trainer (train.trainer = \"grpo\" or \"ppo\")")]
    NotRl,
    #[error("model.path: {0}")]
    Model(#[from] rtrain_trainer::hf::HfError),
    #[error(transparent)]
    Prompts(#[from] PromptError),
    #[error("data.source: RL reads a JSONL file of prompts; name it here")]
    NoFile,
    #[error("data.max_len ({max_len}) must exceed rl.max_new_tokens ({new_tokens}) to leave room for a prompt")]
    NoRoom { max_len: usize, new_tokens: usize },
    #[error("{}: RL needs at least two prompts (one is held out for evaluation)", path.display())]
    TooFew { path: PathBuf },
}

/// The job's RL settings and data, as every process of the job reads them.
#[derive(Debug)]
pub struct RlSetup {
    pub rl: RlSpec,
    pub model_dir: PathBuf,
    /// Longest prompt + response, in tokens.
    pub max_len: usize,
    pub tokenizer: Tokenizer,
    pub train: Vec<Prompt>,
    pub eval: Vec<Prompt>,
}

impl RlSetup {
    pub fn load(spec: &JobSpec) -> Result<Self, SetupError> {
        let TrainerKind::Rl { model, max_len, rl } = &spec.trainer else { return Err(SetupError::NotRl) };
        let DataSpec::File(source) = &spec.data else { return Err(SetupError::NoFile) };
        if *max_len <= rl.max_new_tokens {
            return Err(SetupError::NoRoom { max_len: *max_len, new_tokens: rl.max_new_tokens });
        }
        let max_prompt = max_len - rl.max_new_tokens;
        let tokenizer = Tokenizer::from_dir(model)?;
        let prompts = load_prompts(source, &tokenizer, max_prompt)?;
        let (train, mut eval) = match &rl.eval {
            EvalSet::File(path) => (prompts, load_prompts(path, &tokenizer, max_prompt)?),
            EvalSet::Fraction(f) => {
                split_held_out(prompts, *f).ok_or_else(|| SetupError::TooFew { path: source.clone() })?
            }
        };
        eval.truncate(rl.eval_max);
        Ok(Self { rl: (**rl).clone(), model_dir: model.clone(), max_len: *max_len, tokenizer, train, eval })
    }
}

/// The shared-memory channel the trainer publishes policy weights on: named after the run and
/// its token, so two runs never share one and every process of a run finds it.
pub fn policy_channel(run_id: &str, token: &str) -> Result<ShmChannel, WeightSyncError> {
    let digest = Sha256::digest(format!("{run_id}\0{token}").as_bytes());
    let tag: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    ShmChannel::new(&format!("run-{tag}"), "policy")
}
