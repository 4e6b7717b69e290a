//! Hugging Face model folders (`config.json`, `*.safetensors`, `tokenizer.json`): the Llama
//! family (Llama, Qwen2) and GPT-2, loaded with transformers' tensor names and saved back in the
//! same layout, so a model trained by rtrain opens in transformers.

pub mod config;
pub mod generate;
pub mod llama;
pub mod reward_model;
pub mod tokenizer;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub use config::{Gpt2Config, HfConfig, LlamaConfig, RopeScaling};
pub(crate) use generate::pick;
pub use generate::{FinishReason, Generation, SamplingParams, generate, generate_groups, score};
pub use llama::{LayerKv, Llama};
pub use reward_model::RewardModel;
pub use tokenizer::{ChatMessage, Tokenizer};

use crate::model::Gpt;

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
}

/// The network of a loaded model.
#[derive(Debug)]
pub enum Network {
    Llama(Llama),
    /// GPT-2 on the built-in GPT: Hugging Face's `Conv1D` weights (`[in, out]`) are transposed
    /// on load and save.
    Gpt2(Gpt),
}

/// A model folder loaded for inference or training.
pub struct HfModel {
    /// Owns the variables the network uses.
    pub vs: VarStore,
    pub network: Network,
    pub config: HfConfig,
    /// `config.json` as read, written back on save.
    pub raw_config: serde_json::Value,
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModel").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Positions counting real tokens only, and the causal attention mask `[B, 1, T, T]` that hides
/// left padding, for ids `[B, T]` whose real tokens `present` marks.
fn padded_attention(ids: &Tensor, present: &Tensor) -> (Tensor, Tensor) {
    let (t, device) = (ids.size()[1], ids.device());
    // The mask may come from the host (a caller's CPU batch) while the ids are on a GPU.
    let present = present.to_device(device).to_kind(Kind::Bool);
    let positions = (present.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
    // A padded query may see itself, so no attention row is empty (its output is unused).
    let eye = Tensor::eye(t, (Kind::Bool, device));
    let mask = causal.unsqueeze(0).logical_and(&present.unsqueeze(1)).logical_or(&eye.unsqueeze(0)).unsqueeze(1);
    (positions, mask)
}

/// The variables of `vs` under transformers' names (GPT-2's `Conv1D` weights transposed).
fn write_weights(vs: &VarStore, gpt2: bool, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<(), HfError> {
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    if gpt2 {
        for (name, t) in tensors.iter_mut() {
            if is_conv1d(name) {
                *t = t.tr().contiguous();
            }
        }
    }
    weights::write_dir_tensors(dir, &tensors, kind, max_shard_bytes)
}

/// Writes the built-in byte-level GPT (`vs`, shaped `cfg`) as a Hugging Face GPT-2 folder:
/// `model.safetensors`, `config.json` and a `tokenizer.json` whose 256 tokens are the bytes
/// (token id = byte value), which `rtrain generate` and transformers both load.
pub fn export_gpt2(vs: &VarStore, cfg: &crate::model::GptConfig, dir: &Path) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(|source| HfError::Io { path: dir.to_path_buf(), source })?;
    write_weights(vs, true, dir, Kind::Float, usize::MAX)?;
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_ctx,
        "n_ctx": cfg.n_ctx,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": true,
        // Bytes only: no BOS or EOS token (GPT-2's defaults would name id 50256).
        "bos_token_id": null,
        "eos_token_id": null,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "dtype": "float32",
    });
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| HfError::Config { path: path.clone(), message: e.to_string() })?;
    std::fs::write(&path, text + "\n").map_err(|source| HfError::Io { path, source })?;
    tokenizer::write_byte_tokenizer(&dir.join("tokenizer.json"))
}

/// GPT-2 weights stored transposed by Hugging Face (`Conv1D`).
fn is_conv1d(name: &str) -> bool {
    name.ends_with(".weight")
        && ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"].iter().any(|m| name.contains(m))
}

impl HfModel {
    /// The architecture of `dir`'s config.json on `device`, with random weights (tch's default
    /// initialisation under the process's seed); the folder needs no weight files.
    pub fn random(dir: &Path, device: Device) -> Result<Self, HfError> {
        let (config, raw_config) = HfConfig::load(dir)?;
        let vs = VarStore::new(device);
        let network = Self::network(&vs, &config);
        Ok(Self { vs, network, config, raw_config })
    }

    fn network(vs: &VarStore, config: &HfConfig) -> Network {
        let root = vs.root();
        match config {
            HfConfig::Llama(c) => Network::Llama(Llama::new(&root, c)),
            HfConfig::Gpt2(c) => Network::Gpt2(c.gpt.init(&root)),
        }
    }

    /// Loads `dir` onto `device` (weights converted to f32).
    /// A config.json whose sizes would not fit in this machine's memory is refused before
    /// anything is allocated (libtorch aborts the process on a failed allocation).
    pub fn load(dir: &Path, device: Device) -> Result<Self, HfError> {
        let (config, raw_config) = HfConfig::load(dir)?;
        check_fits_in_memory(&config, &dir.join("config.json"))?;
        let vs = VarStore::new(device);
        let network = Self::network(&vs, &config);
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let mut tensors = weights::read_dir_tensors(dir)?;
        let ignore: fn(&str) -> bool = match &config {
            HfConfig::Llama(c) => {
                if c.tie_word_embeddings {
                    |n| n.ends_with("rotary_emb.inv_freq") || n == "lm_head.weight"
                } else {
                    |n| n.ends_with("rotary_emb.inv_freq")
                }
            }
            HfConfig::Gpt2(_) => {
                // Checkpoints name GPT-2 tensors with or without the `transformer.` prefix.
                tensors = tensors
                    .into_iter()
                    .map(|(name, t)| {
                        let name = if name.starts_with("transformer.") || name == "lm_head.weight" {
                            name
                        } else {
                            format!("transformer.{name}")
                        };
                        let t = if is_conv1d(&name) { t.tr().contiguous() } else { t };
                        (name, t)
                    })
                    .collect();
                |n| n.ends_with(".attn.bias") || n.ends_with(".attn.masked_bias") || n == "lm_head.weight"
            }
        };
        weights::assign(dir, &vars, tensors, ignore)?;
        Ok(Self { vs, network, config, raw_config })
    }

    /// Saves config.json and the weights (`kind`: f32 or bf16) with transformers' names, in one
    /// file or in shards of at most `max_shard_bytes`.
    pub fn save(&self, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<(), HfError> {
        write_weights(&self.vs, matches!(self.network, Network::Gpt2(_)), dir, kind, max_shard_bytes)?;
        let mut config = self.raw_config.clone();
        if let Some(obj) = config.as_object_mut() {
            let dtype = if kind == Kind::BFloat16 { "bfloat16" } else { "float32" };
            // transformers 5 writes `dtype`, 4.x `torch_dtype`; keep whichever the folder used.
            let key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
            obj.insert(key.into(), dtype.into());
        }
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| HfError::Config { path: path.clone(), message: e.to_string() })?;
        std::fs::write(&path, text + "\n").map_err(|source| HfError::Io { path, source })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Transformer layers (one cache entry each).
    pub fn num_layers(&self) -> i64 {
        match &self.network {
            Network::Llama(m) => m.config().num_hidden_layers,
            Network::Gpt2(m) => m.config().n_layer,
        }
    }

    /// Logits `[B, T, vocab]` for `ids` at `positions` (`[B, T]`), attending as `mask`
    /// (`[B, 1, T, S]`) over the positions kept in `cache` and these.
    pub fn forward_cached(&self, ids: &Tensor, positions: &Tensor, mask: &Tensor, cache: &mut [LayerKv]) -> Tensor {
        match &self.network {
            Network::Llama(m) => m.forward(ids, positions, Some(mask), Some(cache)),
            Network::Gpt2(m) => m.forward_at(ids, positions, Some(mask), Some(cache)),
        }
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]` in which `present` (`[B, T]`, nonzero on
    /// real tokens) marks left padding: padded keys are masked out of attention and positions
    /// count real tokens only. Right padding needs no mask (causal attention never sees it).
    pub fn logits_padded(&self, ids: &Tensor, present: &Tensor) -> Tensor {
        let (positions, mask) = padded_attention(ids, present);
        match &self.network {
            Network::Llama(m) => m.forward(ids, &positions, Some(&mask), None),
            Network::Gpt2(m) => m.forward_at(ids, &positions, Some(&mask), None),
        }
    }

    /// The final hidden states `[B, T, hidden]` for left-padded `ids`, as [`HfModel::logits_padded`]
    /// reads them (Llama family only: the value head of a PPO critic reads these).
    pub fn hidden_padded(&self, ids: &Tensor, present: &Tensor) -> Result<Tensor, HfError> {
        let (positions, mask) = padded_attention(ids, present);
        match &self.network {
            Network::Llama(m) => Ok(m.hidden(ids, &positions, Some(&mask), None)),
            Network::Gpt2(_) => Err(HfError::Config {
                path: "config.json".into(),
                message: "hidden states are read from Llama-family models only (not GPT-2)".into(),
            }),
        }
    }

    /// The width of the hidden states.
    pub fn hidden_size(&self) -> i64 {
        match &self.config {
            HfConfig::Llama(c) => c.hidden_size,
            HfConfig::Gpt2(c) => c.gpt.n_embd,
        }
    }

    /// Refuses token ids the model cannot take: an id past its vocabulary, or more tokens than
    /// its positions (`what` names them in the message: "the prompt: token id ...").
    pub fn check_tokens(&self, what: &str, ids: &[u32]) -> Result<(), HfError> {
        let vocab = self.config.vocab_size();
        let limit = self.config.max_positions();
        let message = if let Some(id) = ids.iter().find(|&&id| i64::from(id) >= vocab) {
            format!("token id {id} is past the model's vocabulary of {vocab} tokens")
        } else if ids.len() as i64 > limit {
            format!("{} tokens are more than the model's {limit} positions; shorten it", ids.len())
        } else {
            return Ok(());
        };
        Err(HfError::Config { path: what.into(), message })
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]` (no padding, positions from 0).
    pub fn logits(&self, ids: &Tensor) -> Tensor {
        match &self.network {
            Network::Llama(m) => {
                let (b, t) = (ids.size()[0], ids.size()[1]);
                let positions = Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0).expand([b, t], false);
                m.forward(ids, &positions, None, None)
            }
            Network::Gpt2(m) => m.forward(ids),
        }
    }
}

/// Refuses a model whose f32 parameters alone would not fit in this machine's memory.
fn check_fits_in_memory(config: &HfConfig, path: &Path) -> Result<(), HfError> {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let memory = u64::try_from(pages).ok().zip(u64::try_from(page).ok()).and_then(|(n, p)| n.checked_mul(p));
    let (Some(memory), bytes) = (memory, config.parameter_count().and_then(|n| n.checked_mul(4))) else {
        return Ok(());
    };
    let gb = |b: u64| b as f64 / 1e9;
    let size = match bytes {
        Some(b) if b <= memory => return Ok(()),
        Some(b) => format!("{:.1} GB of f32 parameters", gb(b)),
        None => "more parameters than 64 bits can count".to_string(),
    };
    Err(HfError::Config {
        path: path.to_path_buf(),
        message: format!(
            "describes a model of {size}, more than this machine's {:.1} GB of memory; check vocab_size and \
             the layer sizes (hidden_size, intermediate_size, num_hidden_layers or n_embd, n_layer)",
            gb(memory)
        ),
    })
}
