//! A learned reward model: a Hugging Face `LlamaForSequenceClassification` or
//! `Qwen2ForSequenceClassification` folder with one label, i.e. the Llama-family body and a
//! `score.weight` `[1, hidden]` head read at the sequence's last token. Loaded to score samples,
//! or built from a causal language model's folder (a new head) to be trained and saved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use super::{HfConfig, HfError, Llama, LlamaConfig, weights};

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
    /// `config.json` as it will be saved (a sequence classifier with one label).
    raw_config: serde_json::Value,
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
        let HfConfig::Llama(cfg) = config else {
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
        let model = Self::build(cfg, raw, device);
        let vars: BTreeMap<String, Tensor> = model.vs.variables().into_iter().collect();
        let tensors = weights::read_dir_tensors(dir)?;
        weights::assign(dir, &vars, tensors, |n| n.ends_with("rotary_emb.inv_freq") || n == "lm_head.weight")?;
        Ok(model)
    }

    /// A reward model on the body of the causal language model in `dir` (a Llama or Qwen2
    /// `...ForCausalLM` folder), with a new score head drawn from N(0, `initializer_range`²) under
    /// the process's seed, as transformers initialises one.
    pub fn from_causal_lm(dir: &Path, device: Device) -> Result<Self, HfError> {
        let (config, mut raw) = HfConfig::load(dir)?;
        let bad = |message: String| HfError::Config { path: dir.join("config.json"), message };
        let HfConfig::Llama(cfg) = config else {
            return Err(bad("a reward model is built on a Llama-family model (Llama, Qwen2), not GPT-2".into()));
        };
        let std = raw["initializer_range"].as_f64().unwrap_or(0.02);
        let class = match cfg.model_type.as_str() {
            "qwen2" => "Qwen2ForSequenceClassification",
            _ => "LlamaForSequenceClassification",
        };
        if let Some(obj) = raw.as_object_mut() {
            obj.insert("architectures".into(), serde_json::json!([class]));
            obj.insert("num_labels".into(), 1.into());
            obj.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            obj.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            // transformers reads the score at the last token that is not the pad token, and
            // refuses batches without a pad id: name one (the EOS when the model has no pad).
            if obj.get("pad_token_id").is_none_or(|v| v.is_null()) {
                let eos = obj.get("eos_token_id").and_then(|e| e.as_i64().or_else(|| e.get(0)?.as_i64()));
                if let Some(eos) = eos {
                    obj.insert("pad_token_id".into(), eos.into());
                }
            }
        }
        let model = Self::build(cfg, raw, device);
        // The body's variables come from the folder; the head is new.
        let vars: BTreeMap<String, Tensor> =
            model.vs.variables().into_iter().filter(|(name, _)| name != "score.weight").collect();
        let tensors = weights::read_dir_tensors(dir)?;
        weights::assign(dir, &vars, tensors, |n| n.ends_with("rotary_emb.inv_freq") || n == "lm_head.weight")?;
        tch::no_grad(|| {
            let _ = model.score.shallow_clone().normal_(0.0, std);
        });
        Ok(model)
    }

    /// The body and an all-zero head; `raw` is the classifier's config.json.
    fn build(mut cfg: LlamaConfig, raw: serde_json::Value, device: Device) -> Self {
        // The score head replaces the language-model head: build no lm_head variable.
        cfg.tie_word_embeddings = true;
        let vs = VarStore::new(device);
        let root = vs.root();
        let body = Llama::new(&root, &cfg);
        let score = (&root / "score").var("weight", &[1, cfg.hidden_size], nn::Init::Const(0.0));
        let pad_id = raw["pad_token_id"].as_i64();
        Self { vs, body, score, pad_id, max_positions: cfg.max_position_embeddings, raw_config: raw }
    }

    /// The variables (transformers' names), for training.
    pub fn vars(&self) -> &VarStore {
        &self.vs
    }

    pub fn config(&self) -> &LlamaConfig {
        self.body.config()
    }

    /// Where transformers reads the score of `ids` (one sequence, no padding): the last token
    /// that is not the pad token, or the first when every token is.
    pub fn read_position(&self, ids: &[i64]) -> usize {
        ids.iter().rposition(|&tok| Some(tok) != self.pad_id).unwrap_or(0)
    }

    /// Scores `[B]` of right-padded `ids` (`[B, T]`), read at `read_at` (`[B]`, positions from
    /// [`RewardModel::read_position`]); differentiable.
    pub fn scores(&self, ids: &Tensor, read_at: &Tensor) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let device = ids.device();
        let positions = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false);
        let hidden = self.body.hidden(ids, &positions, None, None);
        let rows = Tensor::arange(b, (Kind::Int64, device)) * t + read_at.to_device(device);
        hidden.view([b * t, -1]).index_select(0, &rows).matmul(&self.score.tr()).view([b])
    }

    /// Saves config.json and the weights (f32) as a sequence classifier transformers opens
    /// with `AutoModelForSequenceClassification`.
    pub fn save(&self, dir: &Path, max_shard_bytes: usize) -> Result<(), HfError> {
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        weights::write_dir_tensors(dir, &tensors, Kind::Float, max_shard_bytes)?;
        let mut config = self.raw_config.clone();
        if let Some(obj) = config.as_object_mut() {
            let key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
            obj.insert(key.into(), "float32".into());
        }
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| HfError::Config { path: path.clone(), message: e.to_string() })?;
        std::fs::write(&path, text + "\n").map_err(|source| HfError::Io { path, source })
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
            let seq: Vec<i64> = seq.iter().map(|&tok| i64::from(tok)).collect();
            ids[r * t as usize..r * t as usize + seq.len()].copy_from_slice(&seq);
            read_at.push(self.read_position(&seq) as i64);
        }
        let device = self.device();
        let ids = Tensor::from_slice(&ids).view([b, t]).to_device(device);
        let scores = tch::no_grad(|| {
            self.scores(&ids, &Tensor::from_slice(&read_at)).to_kind(Kind::Double).to_device(Device::Cpu)
        });
        Vec::<f64>::try_from(&scores)
            .map_err(|e| HfError::Config { path: PathBuf::from("reward scores"), message: e.to_string() })
    }
}
