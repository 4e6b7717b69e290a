//! One GPT-2 transformer block: pre-LayerNorm causal self-attention and a GELU MLP, each wrapped in
//! a residual connection.

use tch::Tensor;
use tch::nn::{self, Module};

use super::LayerKv;
use super::gpt::GptConfig;

/// Standard deviation of GPT-2's normal initialisation for weights and embeddings.
pub(super) const INIT_STD: f64 = 0.02;

/// A `[out, in]` linear layer with a bias, GPT-2 initialised: weight ~ N(0, `std`), bias = 0.
///
/// Hugging Face's GPT-2 uses `Conv1D`, which stores the same weight transposed (`[in, out]`);
/// a checkpoint converter must transpose `c_attn`, `c_proj` and `c_fc` weights.
fn gpt2_linear(path: nn::Path, in_dim: i64, out_dim: i64, std: f64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(path, in_dim, out_dim, cfg)
}

/// LayerNorm with GPT-2's settings: eps 1e-5, weight 1, bias 0.
pub(super) fn gpt2_layer_norm(path: nn::Path, n_embd: i64) -> nn::LayerNorm {
    nn::layer_norm(path, vec![n_embd], nn::LayerNormConfig::default())
}

/// Multi-head causal self-attention with a fused QKV projection (`c_attn`, `[3C, C]`).
#[derive(Debug)]
struct CausalSelfAttention {
    c_attn: nn::Linear,
    c_proj: nn::Linear,
    n_head: i64,
}

impl CausalSelfAttention {
    fn new(path: nn::Path, cfg: &GptConfig, proj_std: f64) -> Self {
        let c = cfg.n_embd;
        Self {
            c_attn: gpt2_linear(&path / "c_attn", c, 3 * c, INIT_STD),
            c_proj: gpt2_linear(&path / "c_proj", c, c, proj_std),
            n_head: cfg.n_head,
        }
    }

    /// `[B, T, C]` -> `[B, T, C]`. Without `mask`, position t attends to positions 0..=t only;
    /// with it (`[B, 1, T, S]`, true = may attend), to what it allows among the cached positions
    /// and these, whose keys and values `cache` then keeps.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, cache: Option<&mut LayerKv>) -> Tensor {
        let (b, t, c) = dims3(x);
        let hs = c / self.n_head;
        let heads = |z: &Tensor| z.view([b, t, self.n_head, hs]).transpose(1, 2);
        let qkv = self.c_attn.forward(x).split(c, 2);
        let (q, mut k, mut v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
        if let Some(cache) = cache {
            (k, v) = cache.append(&k, &v);
        }
        let y = match mask {
            Some(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, false),
            None => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false),
        };
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        self.c_proj.forward(&y)
    }
}

/// The 4x-wide feed-forward layer with tanh-approximated GELU (Hugging Face's `gelu_new`).
#[derive(Debug)]
struct Mlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
}

impl Mlp {
    fn new(path: nn::Path, cfg: &GptConfig, proj_std: f64) -> Self {
        let c = cfg.n_embd;
        Self {
            c_fc: gpt2_linear(&path / "c_fc", c, 4 * c, INIT_STD),
            c_proj: gpt2_linear(&path / "c_proj", 4 * c, c, proj_std),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.c_proj.forward(&self.c_fc.forward(x).gelu("tanh"))
    }
}

/// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`; variables live under `transformer.h.{i}`.
#[derive(Debug)]
pub(super) struct Block {
    ln_1: nn::LayerNorm,
    attn: CausalSelfAttention,
    ln_2: nn::LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub(super) fn new(path: nn::Path, cfg: &GptConfig) -> Self {
        // GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two.
        let proj_std = INIT_STD / (2.0 * cfg.n_layer as f64).sqrt();
        Self {
            ln_1: gpt2_layer_norm(&path / "ln_1", cfg.n_embd),
            attn: CausalSelfAttention::new(&path / "attn", cfg, proj_std),
            ln_2: gpt2_layer_norm(&path / "ln_2", cfg.n_embd),
            mlp: Mlp::new(&path / "mlp", cfg, proj_std),
        }
    }

    pub(super) fn forward(&self, x: &Tensor, mask: Option<&Tensor>, cache: Option<&mut LayerKv>) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), mask, cache);
        let h = self.mlp.forward(&self.ln_2.forward(&x));
        x + h
    }
}

/// The `[B, T, C]` sizes of an activation; the model builds every activation, so this is an
/// internal invariant rather than a user error.
fn dims3(x: &Tensor) -> (i64, i64, i64) {
    match x.size().as_slice() {
        &[b, t, c] => (b, t, c),
        other => panic!("GPT activation must be [B, T, C], got {other:?}"),
    }
}
