//! Batched generation with a KV cache: greedy (temperature 0) or sampling with temperature,
//! top-k and top-p, stopping at stop tokens, stop strings or a length limit; seeded and
//! reproducible. Each sequence comes back with its tokens, text, per-token log-probabilities and
//! why it finished.
//!
//! Llama-family and GPT-2 models alike. Prompts of different lengths are left-padded into one batch; padded positions are masked out
//! of attention and rotary positions count real tokens only, so a prompt generates the same
//! tokens alone or in a batch (up to float rounding). Sampling runs on the host in f64 from each
//! row's logits, with one random stream per sequence. A group of samples per prompt
//! ([`generate_groups`]) shares the prompt's prefill.

use serde::Serialize;
use tch::{Kind, Tensor};

use super::{HfError, HfModel, LayerKv, Tokenizer};
use crate::data::splitmix::SplitMix64;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    /// Keep the k likeliest tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of likeliest tokens whose probability reaches p; 1 keeps all.
    pub top_p: f64,
    pub seed: u64,
    /// Tokens that end a sequence (kept in its output), besides the tokenizer's EOS ids.
    pub stop_token_ids: Vec<u32>,
    /// Texts that end a sequence; the text is cut before them.
    pub stop_strings: Vec<String>,
    /// Report log-probs under the temperature-scaled distribution (softmax of logits / T) rather
    /// than the raw logits: what an RL behaviour policy that samples at T is.
    pub logprobs_at_temperature: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            logprobs_at_temperature: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens`, or the model's longest context.
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub text: String,
    /// log p(token) under the model (softmax of the raw logits, before temperature, top-k or
    /// top-p), per generated token.
    pub logprobs: Vec<f64>,
    pub finish_reason: FinishReason,
}

/// Generates one continuation per prompt (token ids), all prompts in one batch.
pub fn generate(
    model: &HfModel,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<Vec<Generation>, HfError> {
    let groups = generate_groups(model, tokenizer, prompts, 1, params)?;
    Ok(groups.into_iter().flatten().collect())
}

/// Generates `group_size` continuations per prompt (as GRPO samples a group per prompt),
/// prefilling each prompt once: the prompts' KV cache is computed as one left-padded batch of P
/// rows, then repeated to P × G rows for decoding.
///
/// Sample j of prompt i draws from the random stream of row i * G + j, so the result equals
/// [`generate`] on each prompt repeated G times (up to float rounding in the log-probs).
pub fn generate_groups(
    model: &HfModel,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    group_size: usize,
    params: &SamplingParams,
) -> Result<Vec<Vec<Generation>>, HfError> {
    if group_size == 0 {
        return Err(HfError::Config { path: "group_size".into(), message: "must be at least 1".into() });
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(HfError::Config { path: "prompt".into(), message: "a prompt must hold at least one token".into() });
    }
    for prompt in prompts {
        model.check_tokens("the prompt", prompt)?;
    }
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = model.config.max_positions() as usize;
    if max_len >= limit {
        return Err(HfError::Config {
            path: "prompt".into(),
            message: format!("{max_len} tokens leave no room in the model's {limit} positions"),
        });
    }
    let budget = params.max_new_tokens.min(limit - max_len);
    let mut stop_ids = tokenizer.stop_ids.clone();
    stop_ids.extend(&params.stop_token_ids);
    // A stop text that is a special token would never appear in the decoded text.
    stop_ids.extend(params.stop_strings.iter().filter_map(|s| tokenizer.special_token_id(s)));
    let mut rows: Vec<Row> = (0..prompts.len() * group_size)
        .map(|i| Row {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            cut: None,
            finish: None,
            rng: SplitMix64::new(params.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        })
        .collect();
    if !rows.is_empty() && budget > 0 {
        tch::no_grad(|| {
            let state = Prefilled::new(model, prompts, budget).repeat_rows(group_size as i64);
            decode(model, state, budget, params, tokenizer, &stop_ids, &mut rows)
        })?;
    }
    let mut generations = rows
        .into_iter()
        .map(|r| {
            let text = match r.cut {
                Some(text) => text,
                None => tokenizer.decode(&r.tokens, true)?,
            };
            Ok(Generation {
                token_ids: r.tokens,
                text,
                logprobs: r.logprobs,
                finish_reason: r.finish.unwrap_or(FinishReason::Length),
            })
        })
        .collect::<Result<Vec<_>, HfError>>()?
        .into_iter();
    Ok((0..prompts.len()).map(|_| generations.by_ref().take(group_size).collect()).collect())
}

struct Row {
    tokens: Vec<u32>,
    logprobs: Vec<f64>,
    /// The text up to a stop string, when one ended the sequence.
    cut: Option<String>,
    finish: Option<FinishReason>,
    rng: SplitMix64,
}

impl Row {
    /// Picks the next token from `logits`, records it, and checks the stop conditions.
    fn push(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        tokenizer: &Tokenizer,
        stop_ids: &[u32],
    ) -> Result<(), HfError> {
        let (token, logprob) = pick(logits, params, &mut self.rng);
        self.tokens.push(token);
        self.logprobs.push(logprob);
        if stop_ids.contains(&token) {
            self.finish = Some(FinishReason::Stop);
        } else if !params.stop_strings.is_empty() {
            let text = tokenizer.decode(&self.tokens, true)?;
            if let Some(at) = params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                self.cut = Some(text[..at].to_string());
                self.finish = Some(FinishReason::Stop);
            }
        }
        Ok(())
    }
}

/// The decoding state after a prefill: per row, the KV cache, which cache positions hold
/// tokens, the next token's position and the logits that pick it.
struct Prefilled {
    cache: Vec<LayerKv>,
    /// `[B, S]`, grown by one column per step.
    present: Tensor,
    /// `[B]`.
    next_pos: Tensor,
    /// `[B, vocab]`.
    last: Tensor,
}

impl Prefilled {
    /// One forward pass over the left-padded batch of `prompts`, with cache room for `budget`
    /// more tokens.
    fn new(model: &HfModel, prompts: &[Vec<u32>], budget: usize) -> Self {
        let device = model.device();
        let (b, p) = (prompts.len() as i64, prompts.iter().map(Vec::len).max().unwrap_or(0) as i64);
        let mut ids = vec![0i64; (b * p) as usize];
        let mut mask = vec![false; (b * p) as usize];
        for (r, prompt) in prompts.iter().enumerate() {
            let offset = p as usize - prompt.len();
            for (j, &t) in prompt.iter().enumerate() {
                ids[r * p as usize + offset + j] = i64::from(t);
                mask[r * p as usize + offset + j] = true;
            }
        }
        let ids = Tensor::from_slice(&ids).view([b, p]).to_device(device);
        let present = Tensor::from_slice(&mask).view([b, p]).to_device(device);
        let positions = (present.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0);
        let causal = Tensor::ones([p, p], (Kind::Bool, device)).tril(0);
        // A padded query may see itself, so no attention row is empty (its output is never used).
        let eye = Tensor::eye(p, (Kind::Bool, device));
        let attn = (causal.unsqueeze(0).logical_and(&present.unsqueeze(1))).logical_or(&eye.unsqueeze(0)).unsqueeze(1);
        let capacity = p + budget as i64;
        let mut cache: Vec<LayerKv> = (0..model.num_layers()).map(|_| LayerKv::with_capacity(capacity)).collect();
        let logits = model.forward_cached(&ids, &positions, &attn, &mut cache);
        let last = logits.select(1, p - 1);
        let next_pos = positions.select(1, p - 1) + 1;
        Self { cache, present, next_pos, last }
    }

    /// Each row repeated `times` times in place (row r becomes rows r * times ..): the cache
    /// is copied, not recomputed.
    fn repeat_rows(mut self, times: i64) -> Self {
        if times == 1 {
            return self;
        }
        for layer in &mut self.cache {
            layer.repeat_rows(times);
        }
        let repeat = |t: &Tensor| t.repeat_interleave_self_int(times, 0, None);
        Self {
            present: repeat(&self.present),
            next_pos: repeat(&self.next_pos),
            last: repeat(&self.last),
            cache: self.cache,
        }
    }
}

/// One token per step from the cache for every row of `state` (`rows` in the same order) until
/// all rows stop or `budget` tokens.
fn decode(
    model: &HfModel,
    state: Prefilled,
    budget: usize,
    params: &SamplingParams,
    tokenizer: &Tokenizer,
    stop_ids: &[u32],
    rows: &mut [Row],
) -> Result<(), HfError> {
    let device = model.device();
    let Prefilled { mut cache, mut present, mut next_pos, mut last } = state;
    let b = rows.len() as i64;
    for step in 0..budget {
        let host = rows_to_host(&last)?;
        let mut next = Vec::with_capacity(rows.len());
        for (row, l) in rows.iter_mut().zip(&host) {
            if row.finish.is_none() {
                row.push(l, params, tokenizer, stop_ids)?;
            }
            next.push(i64::from(*row.tokens.last().unwrap_or(&0)));
        }
        if rows.iter().all(|r| r.finish.is_some()) || step + 1 == budget {
            break;
        }
        let ids = Tensor::from_slice(&next).view([b, 1]).to_device(device);
        present = Tensor::cat(&[present, Tensor::ones([b, 1], (Kind::Bool, device))], 1);
        let attn = present.view([b, 1, 1, -1]);
        let logits = model.forward_cached(&ids, &next_pos.view([b, 1]), &attn, &mut cache);
        last = logits.select(1, 0);
        let _ = next_pos.g_add_scalar_(1);
    }
    Ok(())
}

fn rows_to_host(logits: &Tensor) -> Result<Vec<Vec<f32>>, HfError> {
    let logits = logits.to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
    let (b, v) = (logits.size()[0] as usize, logits.size()[1] as usize);
    let flat = Vec::<f32>::try_from(logits.view([-1]))
        .map_err(|e| HfError::Config { path: "logits".into(), message: e.to_string() })?;
    Ok((0..b).map(|r| flat[r * v..(r + 1) * v].to_vec()).collect())
}

/// The next token and its log-probability under the raw logits (or, with
/// `logprobs_at_temperature`, under logits / temperature).
pub(crate) fn pick(logits: &[f32], params: &SamplingParams, rng: &mut SplitMix64) -> (u32, f64) {
    let scale = if params.logprobs_at_temperature && params.temperature > 0.0 { params.temperature } else { 1.0 };
    let log_probs = log_softmax(logits.iter().map(|&x| f64::from(x) / scale));
    if params.temperature <= 0.0 {
        // The first of equal maxima, as torch.argmax picks.
        let best = logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best });
        return (best as u32, log_probs[best]);
    }
    let mut candidates: Vec<(usize, f64)> =
        logits.iter().map(|&x| f64::from(x) / params.temperature).enumerate().collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        candidates.truncate(params.top_k);
    }
    let probs = log_softmax(candidates.iter().map(|c| c.1)).into_iter().map(f64::exp).collect::<Vec<_>>();
    let mut keep = probs.len();
    if params.top_p < 1.0 {
        let mut total = 0.0;
        for (i, p) in probs.iter().enumerate() {
            total += p;
            if total >= params.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    let mass: f64 = probs[..keep].iter().sum();
    // Uniform in [0, 1) from the top 53 bits.
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * mass;
    let mut chosen = keep - 1;
    for (i, p) in probs[..keep].iter().enumerate() {
        if u < *p {
            chosen = i;
            break;
        }
        u -= p;
    }
    let token = candidates[chosen].0;
    (token as u32, log_probs[token])
}

fn log_softmax(xs: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = xs.clone().map(|x| (x - max).exp()).sum();
    let log_sum = max + sum.ln();
    xs.map(|x| x - log_sum).collect()
}

/// Per-token log-probabilities of `ids` under the model: entry t is log p(ids[t] | ids[..t]),
/// `None` for the first token.
pub fn score(model: &HfModel, ids: &[u32]) -> Result<Vec<Option<f64>>, HfError> {
    model.check_tokens("the text", ids)?;
    let input = Tensor::from_slice(&ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>())
        .view([1, -1])
        .to_device(model.device());
    let logits = tch::no_grad(|| model.logits(&input).select(0, 0));
    let rows = rows_to_host(&logits)?;
    let mut out = vec![None];
    for t in 1..ids.len() {
        let lp = log_softmax(rows[t - 1].iter().map(|&x| f64::from(x)));
        out.push(Some(lp[ids[t] as usize]));
    }
    Ok(out)
}
