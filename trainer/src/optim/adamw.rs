//! AdamW over a [`FlatParams`] buffer: `torch.optim.AdamW` semantics (decoupled weight decay, bias
//! correction), done as a handful of whole-buffer in-place ops instead of a loop over variables.

use tch::Tensor;

use super::flat::FlatParams;

/// AdamW hyper-parameters other than the learning rate, which the schedule supplies per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decay rate of the first-moment average.
    pub beta1: f64,
    /// Decay rate of the second-moment average.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay, applied only to the first `decay_numel` parameters.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// GPT-2/nanoGPT's choice: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// AdamW state for one flat parameter buffer: the step count and the two moment buffers.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Reused for `(1 - beta2) * g` and the update, so a step allocates nothing.
    scratch: Tensor,
}

impl AdamW {
    /// Zero moments shaped like `params`' flat buffer, on its device.
    pub fn new(cfg: AdamWConfig, params: &FlatParams) -> Self {
        Self {
            cfg,
            step: 0,
            exp_avg: params.params().zeros_like(),
            exp_avg_sq: params.params().zeros_like(),
            scratch: params.params().zeros_like(),
        }
    }

    /// One update of `params` from its flat gradient buffer (gathered, reduced and clipped by the
    /// caller), at learning rate `lr`. For step t, with g the gradient:
    ///
    /// ```text
    /// p[..decay_numel] *= 1 - lr * weight_decay
    /// m = beta1 * m + (1 - beta1) * g
    /// v = beta2 * v + (1 - beta2) * g * g
    /// p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    /// ```
    pub fn step(&mut self, params: &FlatParams, lr: f64) {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        self.step += 1;
        // In f64 on the host, like torch's non-capturable path (`1 - beta1 ** step`).
        let t = self.step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2_sqrt = (1.0 - beta2.powf(t)).sqrt();
        let step_size = lr / bias_correction1;

        let grad = params.grads();
        let update = FusedUpdate {
            decay: 1.0 - (lr * weight_decay) as f32,
            decay_numel: params.decay_numel() as usize,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2_sqrt as f32,
            eps: eps as f32,
            neg_step_size: -step_size as f32,
        };
        if update.apply_to_cpu_f32([params.params(), grad, &self.exp_avg, &self.exp_avg_sq]) {
            return;
        }
        // A second handle to the flat buffer: in-place ops need `&mut`, the storage is shared.
        let mut p = params.params().shallow_clone();
        tch::no_grad(|| {
            if weight_decay != 0.0 && params.decay_numel() > 0 {
                let _ = p.narrow(0, 0, params.decay_numel()).g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let _ = self.exp_avg.lerp_(grad, 1.0 - beta1);
            let _ = self.exp_avg_sq.g_mul_scalar_(beta2);
            self.scratch.copy_(grad);
            let _ = self.scratch.g_mul_scalar_(1.0 - beta2);
            let _ = self.exp_avg_sq.addcmul_(&self.scratch, grad);
            // scratch = -step_size * m / (sqrt(v) / bc2_sqrt + eps)
            let _ = self.exp_avg_sq.sqrt_out(&self.scratch);
            let _ = self.scratch.g_div_scalar_(bias_correction2_sqrt);
            let _ = self.scratch.g_add_scalar_(eps);
            let _ = self.exp_avg.div_out(&self.scratch, &self.scratch);
            let _ = self.scratch.g_mul_scalar_(-step_size);
            let _ = p.g_add_(&self.scratch);
        });
    }

    /// Number of steps taken (restored on resume); the next step's bias correction uses it + 1.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// First-moment buffer, laid out like the flat parameters (see [`FlatParams::entries`]).
    pub fn exp_avg(&self) -> &Tensor {
        &self.exp_avg
    }

    /// Second-moment buffer, laid out like the flat parameters.
    pub fn exp_avg_sq(&self) -> &Tensor {
        &self.exp_avg_sq
    }

    /// Restores the state saved by a checkpoint: the step count and both moment buffers (copied,
    /// converted to this optimizer's dtype and device).
    ///
    /// # Panics
    /// If a buffer does not have the flat parameter count; checkpoint loading should check the
    /// shapes against the manifest first.
    pub fn restore(&mut self, step: u64, exp_avg: &Tensor, exp_avg_sq: &Tensor) {
        let want = self.exp_avg.size();
        for (name, src) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
            if src.size() != want {
                panic!("AdamW::restore: {name} has shape {:?}, expected {want:?}", src.size());
            }
        }
        tch::no_grad(|| {
            self.exp_avg.copy_(exp_avg);
            self.exp_avg_sq.copy_(exp_avg_sq);
        });
        self.step = step;
    }
}

/// One AdamW step for CPU f32 buffers in a single pass over memory, with the arithmetic of the
/// tensor path above (and of torch's `_single_tensor_adam`): `lerp` for the first moment,
/// `mul` then `addcmul` for the second, `sqrt / bc2_sqrt + eps`, then `addcdiv`. The tensor path
/// reads and writes the buffers about ten times; this reads each once.
struct FusedUpdate {
    decay: f32,
    decay_numel: usize,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl FusedUpdate {
    fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let decayed = self.decay_numel.min(p.len());
        for x in &mut p[..decayed] {
            *x *= self.decay;
        }
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            // torch's lerp(start, end, w) for w < 0.5: start + w * (end - start).
            *m += self.one_minus_beta1 * (g - *m);
            *v = *v * self.beta2 + self.one_minus_beta2 * (g * g);
            let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
            *p += self.neg_step_size * (*m / denom);
        }
    }
}

impl FusedUpdate {
    /// Applies the update to the parameter, gradient and moment buffers if all four are
    /// same-length, contiguous CPU f32 tensors; returns false (nothing done) otherwise, and the
    /// caller uses tensor ops (other devices and dtypes).
    fn apply_to_cpu_f32(&self, [p, g, m, v]: [&Tensor; 4]) -> bool {
        let n = p.numel();
        let ok = [p, g, m, v].iter().all(|t| {
            t.device() == tch::Device::Cpu && t.kind() == tch::Kind::Float && t.is_contiguous() && t.numel() == n
        });
        if !ok {
            return false;
        }
        // SAFETY: the four tensors are distinct, contiguous CPU f32 buffers of n elements (the
        // flat parameters, gradients and the two moments never alias) and stay alive for this
        // call; nothing else reads or writes them while `AdamW::step` runs.
        let slice = |t: &Tensor| unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n) };
        self.apply(slice(p), slice(g), slice(m), slice(v));
        true
    }
}
