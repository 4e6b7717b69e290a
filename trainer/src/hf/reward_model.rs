//! A learned reward model: a Hugging Face `LlamaForSequenceClassification` or
//! `Qwen2ForSequenceClassification` folder with one label, i.e. the Llama-family body and a
//! `score.weight` `[1, hidden]` head read at the sequence's last token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use super::{HfConfig, HfError, Llama, weights};

/// A loaded reward model.
pub struct RewardModel {
    /// Owns the variables of `body` and `score`.
    vs: VarStore,
    body: Llama,
    /// `[1, hidden]`.
    score: Tensor,
    /// transformers reads the score at the last token that is not this one.
    pad_id: Option<i64>,
    max_positions: i64,
}

impl std::fmt::Debug for RewardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardModel").field("config", self.body.config()).finish_non_exhaustive()
    }
}

impl RewardModel {
    /// Loads `dir` onto `device` (weights converted to f32).
    pub fn load(dir: &Path, device: Device) -> Result<Self, HfError> {
        let (config, raw) = HfConfig::load(dir)?;
        let bad = |message: String| HfError::Config { path: dir.join("config.json"), message };
        let HfConfig::Llama(mut cfg) = config else {
            return Err(bad("a reward model must be a Llama or Qwen2 sequence classifier".into()));
        };
        let architectures: Vec<&str> =
            raw["architectures"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
        if !architectures.iter().any(|a| a.ends_with("ForSequenceClassification")) {
            return Err(bad(format!("architectures {architectures:?}: not a ...ForSequenceClassification model")));
        }
        // transformers' default is 2 labels when the config names none.
        let labels = raw["num_labels"].as_u64().or_else(|| raw["id2label"].as_object().map(|m| m.len() as u64));
        if labels.unwrap_or(2) != 1 {
            return Err(bad(format!("{} labels; a reward model has one", labels.unwrap_or(2))));
        }
        // The score head replaces the language-model head: build no lm_head variable.
        cfg.tie_word_embeddings = true;
        let vs = VarStore::new(device);
        let root = vs.root();
        let body = Llama::new(&root, &cfg);
        let score = (&root / "score").var("weight", &[1, cfg.hidden_size], nn::Init::Const(0.0));
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let tensors = weights::read_dir_tensors(dir)?;
        weights::assign(dir, &vars, tensors, |n| n.ends_with("rotary_emb.inv_freq") || n == "lm_head.weight")?;
        let pad_id = raw["pad_token_id"].as_i64();
        Ok(Self { vs, body, score, pad_id, max_positions: cfg.max_position_embeddings })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// One score per sequence of token ids, all in one batch: the head on the final hidden state
    /// of the last token that is not the pad token, as transformers picks it.
    pub fn score(&self, sequences: &[Vec<u32>]) -> Result<Vec<f64>, HfError> {
        let too_long = sequences.iter().map(Vec::len).find(|&n| n == 0 || n as i64 > self.max_positions);
        if let Some(n) = too_long {
            let path = PathBuf::from("reward input");
            let message = format!("{n} tokens; a reward model takes 1 to {} tokens", self.max_positions);
            return Err(HfError::Config { path, message });
        }
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let (b, t) = (sequences.len() as i64, sequences.iter().map(Vec::len).max().unwrap_or(0) as i64);
        // Right padding: causal attention never lets a real token see the padding after it.
        let mut ids = vec![0i64; (b * t) as usize];
        let mut read_at = Vec::with_capacity(sequences.len());
        for (r, seq) in sequences.iter().enumerate() {
            for (j, &tok) in seq.iter().enumerate() {
                ids[r * t as usize + j] = i64::from(tok);
            }
            // transformers: argmax of index * (id != pad), so 0 when every token is the pad.
            let last = seq.iter().rposition(|&tok| Some(i64::from(tok)) != self.pad_id).unwrap_or(0);
            read_at.push(r as i64 * t + last as i64);
        }
        let device = self.device();
        let ids = Tensor::from_slice(&ids).view([b, t]).to_device(device);
        let positions = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false);
        let scores = tch::no_grad(|| {
            let hidden = self.body.hidden(&ids, &positions, None, None);
            let last = hidden.view([b * t, -1]).index_select(0, &Tensor::from_slice(&read_at).to_device(device));
            last.matmul(&self.score.tr()).view([b]).to_kind(Kind::Double).to_device(Device::Cpu)
        });
        Vec::<f64>::try_from(&scores)
            .map_err(|e| HfError::Config { path: PathBuf::from("reward scores"), message: e.to_string() })
    }
}
