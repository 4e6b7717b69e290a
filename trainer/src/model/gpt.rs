//! A GPT-2-style byte-level language model: token + learned position embeddings, pre-LayerNorm
//! blocks, a final LayerNorm and an output head tied to the token embedding. No dropout.
//!
//! Variables use Hugging Face GPT-2 names (`transformer.wte.weight`, `transformer.h.0.ln_1.weight`,
//! `transformer.h.0.attn.c_attn.weight`, ...) so checkpoints keep stable names. One difference:
//! our projections are `nn::Linear` weights stored `[out, in]`, whereas Hugging Face's `Conv1D`
//! stores `[in, out]`; loading a Hugging Face checkpoint means transposing the `c_attn`, `c_proj`
//! and `c_fc` weights. There is no separate `lm_head.weight`: the head reuses `transformer.wte`.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

use super::LayerKv;
use super::ModelError;
use super::gpt_block::{Block, INIT_STD, gpt2_layer_norm};

/// The shape of a GPT model; `n_embd` must be divisible by `n_head`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct GptConfig {
    /// Vocabulary size (256 for bytes).
    pub vocab_size: i64,
    /// Longest sequence the position embedding covers.
    pub n_ctx: i64,
    /// Number of transformer blocks.
    pub n_layer: i64,
    /// Attention heads per block.
    pub n_head: i64,
    /// Width of the residual stream.
    pub n_embd: i64,
}

impl GptConfig {
    /// Checks that every size is positive and that the heads split `n_embd` evenly.
    pub fn validate(&self) -> Result<(), ModelError> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_ctx", self.n_ctx),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ];
        for (field, value) in sizes {
            if value <= 0 {
                return Err(ModelError::InvalidConfig { field, reason: format!("must be positive, got {value}") });
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(ModelError::InvalidConfig {
                field: "n_head",
                reason: format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head),
            });
        }
        Ok(())
    }

    /// Number of trainable scalars (the tied head adds none).
    pub fn num_params(&self) -> i64 {
        let c = self.n_embd;
        let per_block = 2 * (2 * c) // ln_1, ln_2
            + (c * 3 * c + 3 * c) // c_attn
            + (c * c + c) // attn.c_proj
            + (c * 4 * c + 4 * c) // c_fc
            + (4 * c * c + c); // mlp.c_proj
        self.vocab_size * c + self.n_ctx * c + self.n_layer * per_block + 2 * c
    }

    /// Creates the model's variables under `path` (normally the VarStore root) with GPT-2's
    /// initialisation: N(0, 0.02) weights and embeddings, N(0, 0.02 / sqrt(2 n_layer)) for the
    /// residual projections, zero biases, unit LayerNorm weights.
    ///
    /// # Panics
    /// If the config is invalid; call [`GptConfig::validate`] first on user-supplied configs.
    pub fn init(&self, path: &nn::Path) -> Gpt {
        if let Err(e) = self.validate() {
            panic!("GptConfig::init: {e}");
        }
        let t = path / "transformer";
        let normal = nn::Init::Randn { mean: 0.0, stdev: INIT_STD };
        let wte = (&t / "wte").var("weight", &[self.vocab_size, self.n_embd], normal);
        let wpe = (&t / "wpe").var("weight", &[self.n_ctx, self.n_embd], normal);
        let h = &t / "h";
        let blocks = (0..self.n_layer).map(|i| Block::new(&h / i, self)).collect();
        let ln_f = gpt2_layer_norm(&t / "ln_f", self.n_embd);
        Gpt { cfg: *self, wte, wpe, blocks, ln_f }
    }
}

/// A GPT-2-style decoder; build it with [`GptConfig::init`].
#[derive(Debug)]
pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
}

impl Gpt {
    /// The config the model was built from.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Token ids `[B, T]` (i64, `T <= n_ctx`) to next-token logits `[B, T, vocab_size]`.
    ///
    /// # Panics
    /// If `idx` is not 2-D or `T > n_ctx` (libtorch errors, e.g. an id out of range, also panic).
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        let t = match idx.size().as_slice() {
            &[_, t] if t <= self.cfg.n_ctx => t,
            other => {
                panic!("Gpt::forward: expected token ids [B, T] with T <= n_ctx = {}, got {other:?}", self.cfg.n_ctx)
            }
        };
        let pos = Tensor::arange(t, (Kind::Int64, idx.device()));
        self.forward_at(idx, &pos, None, None)
    }

    /// Logits for `idx` `[B, T]` at `positions` (`[T]` or `[B, T]`), attending as `mask`
    /// (`[B, 1, T, S]`, true = may attend; plainly causal without it) over the positions kept
    /// in `cache` (one per block) and these.
    pub fn forward_at(
        &self,
        idx: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut [LayerKv]>,
    ) -> Tensor {
        let tok_emb = Tensor::embedding(&self.wte, idx, -1, false, false);
        let pos_emb = Tensor::embedding(&self.wpe, positions, -1, false, false);
        let mut x = tok_emb + pos_emb;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, mask, cache.as_deref_mut().map(|c| &mut c[i]));
        }
        let x = self.ln_f.forward(&x);
        x.linear(&self.wte, None::<Tensor>)
    }

    /// Mean next-token cross-entropy of `forward(idx)` against `targets` (`[B, T]` i64), as
    /// `torch.nn.functional.cross_entropy` computes it.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.forward(idx);
        logits.view([-1, self.cfg.vocab_size]).cross_entropy_loss(
            &targets.view([-1]),
            None::<Tensor>,
            Reduction::Mean,
            -100,
            0.0,
        )
    }
}
