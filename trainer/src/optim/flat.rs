//! One contiguous f32 buffer for all trainable parameters (and one for their gradients), so the
//! optimizer step and the gradient all-reduce each touch a single tensor.
//!
//! Each trainable variable of the `VarStore` is re-homed into a slice of the flat buffer with
//! `set_data`, the idiom behind PyTorch's `p.data = flat[off:off + n].view_as(p)`: the variable
//! stays the same autograd leaf (every handle to it, in the model's layers and in the VarStore, sees
//! the new storage), while writes to the flat buffer under `no_grad` change the model.
//!
//! Invariant: `set_data` gives the variables their own version counters, so autograd cannot see
//! writes made through the flat buffer. Mutate it only between `backward` and the next forward
//! (the optimizer step), never while a graph that saved the parameters is still to be run.

use tch::{Kind, Tensor, nn};

/// Where one variable lives in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatEntry {
    /// The VarStore name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// First element in the flat buffer.
    pub offset: i64,
    /// The variable's shape.
    pub shape: Vec<i64>,
}

impl FlatEntry {
    /// Number of elements the entry spans.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// The trainable parameters of a `VarStore`, re-homed into one flat f32 buffer.
///
/// Layout: variables with two or more dimensions (matrices and embeddings, which get weight
/// decay) first, then the rest (biases, LayerNorm), each group sorted by name. The layout is
/// therefore the same on every rank that builds the same model.
#[derive(Debug)]
pub struct FlatParams {
    params: Tensor,
    grads: Tensor,
    entries: Vec<FlatEntry>,
    /// Shallow handles to the variables, in `entries` order.
    vars: Vec<Tensor>,
    decay_numel: i64,
}

impl FlatParams {
    /// Re-homes every trainable variable of `vs` (the named variables that require grad) into a
    /// new flat f32 buffer on the store's device; the variables keep their values but become f32.
    ///
    /// Build it after the model and before any forward pass. Later `VarStore::load` calls write
    /// through the views as long as the file holds f32 tensors (a different dtype makes `load`
    /// replace the variable's storage and silently detaches it from the flat buffer).
    pub fn new(vs: &nn::VarStore) -> Self {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        // Decay group (dim >= 2) first, then by name: must match on every rank.
        named.sort_by(|(a, ta), (b, tb)| (ta.dim() < 2, a).cmp(&(tb.dim() < 2, b)));

        let mut entries = Vec::with_capacity(named.len());
        let mut offset = 0;
        let mut decay_numel = 0;
        for (name, var) in &named {
            let entry = FlatEntry { name: name.clone(), offset, shape: var.size() };
            offset += entry.numel();
            if var.dim() >= 2 {
                decay_numel = offset;
            }
            entries.push(entry);
        }

        let options = (Kind::Float, vs.device());
        let params = Tensor::zeros([offset], options);
        let grads = Tensor::zeros([offset], options);
        let mut vars = Vec::with_capacity(named.len());
        tch::no_grad(|| {
            for ((_, mut var), entry) in named.into_iter().zip(&entries) {
                let mut slot = params.narrow(0, entry.offset, entry.numel());
                slot.copy_(&var.reshape([-1]));
                var.set_data(&slot.view(entry.shape.as_slice()));
                vars.push(var);
            }
        });
        let mut flat = Self { params, grads, entries, vars, decay_numel };
        flat.attach_grads();
        flat
    }

    /// Makes each variable's `.grad` its slice of the flat gradient buffer, so backward
    /// accumulates straight into the buffer: no per-variable gradient tensors, no gather copy.
    fn attach_grads(&mut self) {
        for (var, entry) in self.vars.iter_mut().zip(&self.entries) {
            // Detached: the same memory, but no autograd view, so code that zeroes a `.grad` the
            // usual way (`detach_()` then `zero_()`, as tch's `zero_grad` does) may still.
            let slot = self.grads.narrow(0, entry.offset, entry.numel()).view(entry.shape.as_slice()).detach();
            if let Err(e) = crate::torch_extras::set_grad(var, &slot) {
                panic!("cannot make {}'s .grad a view of the flat gradient buffer: {e}", entry.name);
            }
        }
    }

    /// The flat parameter buffer; the model's variables are views of it.
    pub fn params(&self) -> &Tensor {
        &self.params
    }

    /// The flat gradient buffer, which the variables' `.grad` tensors are views of.
    pub fn grads(&self) -> &Tensor {
        &self.grads
    }

    /// The flat gradient buffer, for in-place all-reduce and scaling.
    pub fn grads_mut(&mut self) -> &mut Tensor {
        &mut self.grads
    }

    /// Makes sure the flat gradient buffer holds every variable's gradient. Backward accumulates
    /// into it already (the `.grad` tensors are views of it); a variable whose `.grad` was
    /// replaced since (code that sets it to `None` or to a tensor of its own) has it copied in
    /// (zeros where it has none) and the view put back.
    pub fn gather_grads(&mut self) {
        let mut detached = false;
        tch::no_grad(|| {
            for (var, entry) in self.vars.iter().zip(&self.entries) {
                let mut slot = self.grads.narrow(0, entry.offset, entry.numel());
                let grad = var.grad();
                if grad.defined() && grad.data_ptr() == slot.data_ptr() {
                    continue;
                }
                detached = true;
                if grad.defined() {
                    slot.copy_(&grad.reshape([-1]));
                } else {
                    let _ = slot.zero_();
                }
            }
        });
        if detached {
            self.attach_grads();
        }
    }

    /// Replaces the flat gradient buffer (before any step) with `buffer`, e.g. memory a
    /// collective reduces in place. It must match the current buffer's length, dtype and device.
    pub fn set_grad_buffer(&mut self, mut buffer: Tensor) {
        assert_eq!(
            (buffer.size(), buffer.kind(), buffer.device()),
            (self.grads.size(), self.grads.kind(), self.grads.device()),
            "a flat gradient buffer must match the one it replaces"
        );
        tch::no_grad(|| buffer.copy_(&self.grads));
        self.grads = buffer;
        self.attach_grads();
    }

    /// Zeroes the gradients (the flat buffer, which the `.grad` tensors are views of) so the
    /// next backward starts a fresh accumulation.
    pub fn zero_grads(&mut self) {
        let _ = tch::no_grad(|| self.grads.zero_());
    }

    /// Scales the flat gradients in place so their global L2 norm is at most `max_norm`, and returns
    /// the norm before clipping, as `torch.nn.utils.clip_grad_norm_` does (including its 1e-6 in
    /// the divisor). Sync point: reads the norm back to the host.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let norm = self.grads.norm().double_value(&[]);
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                let _ = self.grads.g_mul_scalar_(coef);
            }
            norm
        })
    }

    /// Total number of parameters.
    pub fn numel(&self) -> i64 {
        self.params.size()[0]
    }

    /// Number of leading elements that get weight decay (the variables with two or more dims).
    pub fn decay_numel(&self) -> i64 {
        self.decay_numel
    }

    /// The layout, in buffer order, for checkpointing.
    pub fn entries(&self) -> &[FlatEntry] {
        &self.entries
    }

    /// The slice of any buffer with this layout (parameters, gradients, optimizer moments) that
    /// belongs to `entry`, shaped like the variable; it shares memory with `buf`.
    pub fn view(&self, buf: &Tensor, entry: &FlatEntry) -> Tensor {
        buf.narrow(0, entry.offset, entry.numel()).view(entry.shape.as_slice())
    }
}
