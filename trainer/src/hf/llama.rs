//! The Llama family (Llama 2/3, Qwen2) as transformers defines it: RMSNorm, rotary position
//! embeddings (with Llama 3 or linear frequency scaling), grouped-query attention, a SwiGLU MLP,
//! tied or untied embeddings and optional projection biases. Variables carry transformers'
//! names (`model.layers.0.self_attn.q_proj.weight`, ...), so weights load and save unchanged.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::{LlamaConfig, RopeScaling};
pub use crate::model::LayerKv;

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
}

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    /// Rotary inverse frequencies, `[head_dim / 2]`, f32.
    inv_freq: Tensor,
}

fn linear(path: nn::Path, input: i64, output: i64, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(path, input, output, cfg)
}

fn rms_weight(path: nn::Path, size: i64) -> Tensor {
    path.var("weight", &[size], nn::Init::Const(1.0))
}

impl Llama {
    /// Creates the variables under `root` (a VarStore root), initialised like transformers'
    /// `_init_weights` (N(0, 0.02), zero biases, unit norms); loading weights overwrites them.
    pub fn new(root: &nn::Path, cfg: &LlamaConfig) -> Self {
        let model = root / "model";
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = &model / "layers" / i;
                let attn = &p / "self_attn";
                let mlp = &p / "mlp";
                Layer {
                    input_layernorm: rms_weight(&p / "input_layernorm", h),
                    self_attn: Attention {
                        q_proj: linear(&attn / "q_proj", h, cfg.num_attention_heads * d, cfg.qkv_bias),
                        k_proj: linear(&attn / "k_proj", h, cfg.num_key_value_heads * d, cfg.qkv_bias),
                        v_proj: linear(&attn / "v_proj", h, cfg.num_key_value_heads * d, cfg.qkv_bias),
                        o_proj: linear(&attn / "o_proj", cfg.num_attention_heads * d, h, cfg.o_bias),
                    },
                    post_attention_layernorm: rms_weight(&p / "post_attention_layernorm", h),
                    mlp: Mlp {
                        gate_proj: linear(&mlp / "gate_proj", h, cfg.intermediate_size, cfg.mlp_bias),
                        up_proj: linear(&mlp / "up_proj", h, cfg.intermediate_size, cfg.mlp_bias),
                        down_proj: linear(&mlp / "down_proj", cfg.intermediate_size, h, cfg.mlp_bias),
                    },
                }
            })
            .collect();
        let embed_tokens =
            (&model / "embed_tokens").var("weight", &[cfg.vocab_size, h], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            (root / "lm_head").var("weight", &[cfg.vocab_size, h], nn::Init::Randn { mean: 0.0, stdev: 0.02 })
        });
        Self {
            embed_tokens,
            layers,
            norm: rms_weight(&model / "norm", h),
            lm_head,
            inv_freq: inv_freq(cfg).to_device(root.device()),
            cfg: cfg.clone(),
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Logits `[B, T, vocab]` for `ids` `[B, T]` at `positions` `[B, T]`.
    ///
    /// `mask` `[B, 1, T, S]` (true = may attend) covers the cached positions and these; without
    /// it attention is plainly causal over `ids` alone. With `cache` (one entry per layer), the
    /// new keys and values are appended and attention sees the cached ones too.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut [LayerKv]>,
    ) -> Tensor {
        let x = self.hidden(ids, positions, mask, cache);
        x.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed_tokens).tr())
    }

    /// The final hidden states `[B, T, hidden]` (after the last norm), which a task head such as
    /// a reward model's `score` reads; arguments as for [`Llama::forward`].
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut [LayerKv]>,
    ) -> Tensor {
        let mut x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        let (cos, sin) = self.rope(positions);
        // Residuals are `x = &x + ...`, never `x += ...`: tch's `+=` is an in-place add, which
        // would overwrite activations autograd saved.
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c[i]);
            let h = rms_norm(&x, &layer.input_layernorm, self.cfg.rms_norm_eps);
            x = &x + self.attention(&layer.self_attn, &h, &cos, &sin, mask, kv);
            let h = rms_norm(&x, &layer.post_attention_layernorm, self.cfg.rms_norm_eps);
            let m = &layer.mlp;
            x = &x + m.down_proj.forward(&(m.gate_proj.forward(&h).silu() * m.up_proj.forward(&h)));
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerKv>,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (heads, kv_heads, d) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let split = |z: Tensor, n: i64| z.view([b, t, n, d]).transpose(1, 2);
        let q = apply_rope(&split(a.q_proj.forward(x), heads), cos, sin);
        let mut k = apply_rope(&split(a.k_proj.forward(x), kv_heads), cos, sin);
        let mut v = split(a.v_proj.forward(x), kv_heads);
        if let Some(cache) = cache {
            (k, v) = cache.append(&k, &v);
        }
        // Grouped-query attention: SDPA maps query head h to key/value head h / (heads / kv_heads),
        // as transformers' repeat_kv does, without copying the keys and values.
        let gqa = heads != kv_heads;
        let y = match mask {
            Some(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa),
            None => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, gqa),
        };
        a.o_proj.forward(&y.transpose(1, 2).contiguous().view([b, t, heads * d]))
    }

    /// cos and sin `[B, 1, T, head_dim]` for `positions` `[B, T]`.
    fn rope(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().unsqueeze(1), emb.sin().unsqueeze(1))
    }
}

/// transformers' RMSNorm: normalise in f32, scale by the weight.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    weight * (xf * (var + eps).rsqrt()).to_kind(kind)
}

/// `x * cos + rotate_half(x) * sin`, rotate_half splitting the head dimension in halves.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    let rotated = Tensor::cat(&[-x2, x1], 3);
    x * cos + rotated * sin
}

/// Rotary inverse frequencies as transformers computes them (f32), scaling included.
fn inv_freq(cfg: &LlamaConfig) -> Tensor {
    let d = cfg.head_dim;
    let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Int64, tch::Device::Cpu)).to_kind(Kind::Float) / d as f64;
    let base = Tensor::from(cfg.rope_theta as f32);
    let inv = base.pow(&exponents).reciprocal();
    match cfg.rope_scaling {
        None => inv,
        Some(RopeScaling::Linear { factor }) => inv / factor,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        }) => {
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv.where_self(&wavelen.le(low_freq_wavelen), &(&inv / factor));
            let smooth = (wavelen.reciprocal() * old - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed: Tensor = (-&smooth + 1.0) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.ge(high_freq_wavelen).logical_and(&wavelen.le(low_freq_wavelen));
            smoothed.where_self(&medium, &scaled)
        }
    }
}
