//! A Hugging Face `config.json`, read into the architectures rtrain implements.

use std::path::Path;

use serde::Deserialize;

use super::HfError;
use crate::model::GptConfig;

/// An architecture from a model folder's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum HfConfig {
    /// Llama and Qwen2 (Qwen2 is Llama with q/k/v biases).
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

/// Rotary embedding frequency scaling (`rope_scaling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3's smooth per-frequency scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama` or `qwen2`.
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias` also covers o).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub gpt: GptConfig,
}

/// The fields rtrain reads; anything else in config.json is kept in the raw JSON only.
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 keeps the rope settings (`rope_theta` included) here.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    // GPT-2
    n_embd: Option<i64>,
    n_layer: Option<i64>,
    n_head: Option<i64>,
    n_positions: Option<i64>,
    n_inner: Option<i64>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f64>,
}

impl HfConfig {
    /// Reads `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<(Self, serde_json::Value), HfError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| HfError::Io { path: path.clone(), source })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| HfError::Config { path: path.clone(), message: e.to_string() })?;
        let raw: Raw = serde_json::from_value(json.clone())
            .map_err(|e| HfError::Config { path: path.clone(), message: e.to_string() })?;
        Ok((Self::from_raw(raw, &path)?, json))
    }

    fn from_raw(raw: Raw, path: &Path) -> Result<Self, HfError> {
        let model_type = raw.model_type.clone().unwrap_or_default();
        let err = |message: String| HfError::Config { path: path.to_path_buf(), message };
        let need = |key: &str, v: Option<i64>| {
            v.filter(|v| *v > 0).ok_or_else(|| err(format!("`{key}` is missing or not positive")))
        };
        match model_type.as_str() {
            "llama" | "qwen2" => {
                let act = raw.hidden_act.as_deref().unwrap_or("silu");
                if act != "silu" {
                    return Err(err(format!("hidden_act `{act}` is not supported (only silu)")));
                }
                if raw.use_sliding_window == Some(true) {
                    return Err(err("use_sliding_window = true is not supported".into()));
                }
                let hidden_size = need("hidden_size", raw.hidden_size)?;
                let heads = need("num_attention_heads", raw.num_attention_heads)?;
                let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
                if kv_heads <= 0 || heads % kv_heads != 0 {
                    return Err(err(format!(
                        "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
                    )));
                }
                let qwen = model_type == "qwen2";
                let attention_bias = raw.attention_bias.unwrap_or(false);
                Ok(HfConfig::Llama(LlamaConfig {
                    vocab_size: need("vocab_size", raw.vocab_size)?,
                    hidden_size,
                    intermediate_size: need("intermediate_size", raw.intermediate_size)?,
                    num_hidden_layers: need("num_hidden_layers", raw.num_hidden_layers)?,
                    num_attention_heads: heads,
                    num_key_value_heads: kv_heads,
                    head_dim: need("head_dim", Some(raw.head_dim.unwrap_or(hidden_size / heads)))?,
                    rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
                    rope_theta: raw
                        .rope_parameters
                        .as_ref()
                        .and_then(|p| p.get("rope_theta"))
                        .and_then(|t| t.as_f64())
                        .or(raw.rope_theta)
                        .unwrap_or(10000.0),
                    rope_scaling: rope_scaling(raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()))
                        .map_err(err)?,
                    max_position_embeddings: need(
                        "max_position_embeddings",
                        Some(raw.max_position_embeddings.unwrap_or(2048)),
                    )?,
                    tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
                    qkv_bias: qwen || attention_bias,
                    o_bias: !qwen && attention_bias,
                    mlp_bias: raw.mlp_bias.unwrap_or(false),
                    model_type,
                }))
            }
            "gpt2" => {
                let act = raw.activation_function.as_deref().unwrap_or("gelu_new");
                if act != "gelu_new" {
                    return Err(err(format!("activation_function `{act}` is not supported (only gelu_new)")));
                }
                let n_embd = need("n_embd", raw.n_embd)?;
                if raw.n_inner.is_some_and(|n| n != 4 * n_embd) {
                    return Err(err("n_inner other than 4 × n_embd is not supported".into()));
                }
                let gpt = GptConfig {
                    vocab_size: need("vocab_size", raw.vocab_size)?,
                    n_ctx: need("n_positions", raw.n_positions)?,
                    n_layer: need("n_layer", raw.n_layer)?,
                    n_head: need("n_head", raw.n_head)?,
                    n_embd,
                };
                gpt.validate().map_err(|e| err(e.to_string()))?;
                let eps = raw.layer_norm_epsilon.unwrap_or(1e-5);
                if (eps - 1e-5).abs() > 1e-12 {
                    return Err(err(format!("layer_norm_epsilon {eps} is not supported (only 1e-5)")));
                }
                Ok(HfConfig::Gpt2(Gpt2Config { gpt }))
            }
            "" => Err(err(format!("no `model_type` (architectures: {:?})", raw.architectures))),
            other => {
                Err(err(format!("model_type `{other}` is not supported; rtrain implements llama, qwen2 and gpt2")))
            }
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            HfConfig::Llama(c) => c.vocab_size,
            HfConfig::Gpt2(c) => c.gpt.vocab_size,
        }
    }

    /// The keys that decide the parameters' names and shapes, named as in config.json: what a
    /// checkpoint must match to be resumed.
    pub fn architecture(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let keys = match self {
            HfConfig::Llama(c) => vec![
                ("model_type", json!(c.model_type)),
                ("vocab_size", json!(c.vocab_size)),
                ("hidden_size", json!(c.hidden_size)),
                ("intermediate_size", json!(c.intermediate_size)),
                ("num_hidden_layers", json!(c.num_hidden_layers)),
                ("num_attention_heads", json!(c.num_attention_heads)),
                ("num_key_value_heads", json!(c.num_key_value_heads)),
                ("head_dim", json!(c.head_dim)),
                ("tie_word_embeddings", json!(c.tie_word_embeddings)),
            ],
            HfConfig::Gpt2(c) => vec![
                ("model_type", json!("gpt2")),
                ("vocab_size", json!(c.gpt.vocab_size)),
                ("n_positions", json!(c.gpt.n_ctx)),
                ("n_layer", json!(c.gpt.n_layer)),
                ("n_head", json!(c.gpt.n_head)),
                ("n_embd", json!(c.gpt.n_embd)),
            ],
        };
        keys.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// How many parameters the architecture holds (embeddings, layers, head), or `None` when
    /// the count does not even fit in 64 bits: read before anything is allocated.
    pub fn parameter_count(&self) -> Option<u64> {
        let n = |v: i64| u64::try_from(v).ok();
        match self {
            HfConfig::Llama(c) => {
                let (h, q, kv) = (
                    n(c.hidden_size)?,
                    n(c.num_attention_heads)?.checked_mul(n(c.head_dim)?)?,
                    n(c.num_key_value_heads)?.checked_mul(n(c.head_dim)?)?,
                );
                let embeddings =
                    n(c.vocab_size)?.checked_mul(h)?.checked_mul(if c.tie_word_embeddings { 1 } else { 2 })?;
                // q, k, v, o projections, gate/up/down, two norms.
                let attention = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
                let mlp = h.checked_mul(n(c.intermediate_size)?)?.checked_mul(3)?;
                let layer = attention.checked_add(mlp)?.checked_add(h.checked_mul(2)?)?;
                embeddings.checked_add(layer.checked_mul(n(c.num_hidden_layers)?)?)?.checked_add(h)
            }
            HfConfig::Gpt2(c) => {
                let e = n(c.gpt.n_embd)?;
                let embeddings = n(c.gpt.vocab_size)?.checked_add(n(c.gpt.n_ctx)?)?.checked_mul(e)?;
                // attention (4 e²), MLP (8 e²), biases and norms (13 e).
                let layer = e.checked_mul(e)?.checked_mul(12)?.checked_add(e.checked_mul(13)?)?;
                embeddings.checked_add(layer.checked_mul(n(c.gpt.n_layer)?)?)?.checked_add(e.checked_mul(2)?)
            }
        }
    }

    /// Longest sequence the model supports.
    pub fn max_positions(&self) -> i64 {
        match self {
            HfConfig::Llama(c) => c.max_position_embeddings,
            HfConfig::Gpt2(c) => c.gpt.n_ctx,
        }
    }
}

fn rope_scaling(value: Option<&serde_json::Value>) -> Result<Option<RopeScaling>, String> {
    let Some(v) = value.filter(|v| !v.is_null()) else { return Ok(None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
    let num = |key: &str| v.get(key).and_then(|x| x.as_f64()).ok_or_else(|| format!("rope_scaling.{key} is missing"));
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: num("factor")? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        other => Err(format!("rope_scaling type `{other}` is not supported (default, linear, llama3)")),
    }
}
