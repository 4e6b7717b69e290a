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

use std::collections::BTreeMap;

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
    /// Where the variable comes in the order the model created its variables (see
    /// [`creation_order`]); backward tends to finish the latest-created first.
    pub created: usize,
}

impl FlatEntry {
    /// Number of elements the entry spans.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// Each trainable variable's position in the order the model created it (the order of
/// `VarStore::trainable_variables`), by name. Models build their layers input first, so backward,
/// which runs from the output, tends to finish the gradients in the reverse of this order (the
/// assumption PyTorch DDP starts its buckets from too). Variables tch cannot place come last, by
/// name.
pub fn creation_order(vs: &nn::VarStore) -> BTreeMap<String, usize> {
    // tch keeps the trainable variables in creation order but names them only in a map; the two
    // hold the same tensors, told apart by their storage (zero-size ones have none to compare).
    let created: Vec<usize> = vs.trainable_variables().iter().map(|t| t.data_ptr() as usize).collect();
    let mut named: Vec<(String, Option<usize>)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(name, t)| {
            let ptr = t.data_ptr() as usize;
            let position = (t.numel() > 0).then(|| created.iter().position(|&p| p == ptr)).flatten();
            (name, position)
        })
        .collect();
    named.sort_by(|(a, pa), (b, pb)| (pa.is_none(), pa, a).cmp(&(pb.is_none(), pb, b)));
    named.into_iter().enumerate().map(|(i, (name, _))| (name, i)).collect()
}

/// The trainable parameters of a `VarStore`, re-homed into one flat f32 buffer.
///
/// Layout: variables with two or more dimensions (matrices and embeddings, which get weight
/// decay) first, then the rest (biases, LayerNorm), each group in the reverse of the order the
/// model created them ([`creation_order`]): roughly the order backward finishes their gradients,
/// so the buffer's slices fill up one after the other and each can be all-reduced while backward
/// goes on. Ranks must use the same order (DDP takes rank 0's).
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
        Self::with_creation_order(vs, &creation_order(vs))
    }

    /// As [`FlatParams::new`], with the creation order given (one [`creation_order`] returned,
    /// possibly another rank's), which should name every trainable variable of `vs`.
    pub fn with_creation_order(vs: &nn::VarStore, order: &BTreeMap<String, usize>) -> Self {
        let mut named: Vec<(String, Tensor, usize)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, t)| {
                // One the order does not name counts as created last, as `creation_order` does.
                let created = order.get(&name).copied().unwrap_or(usize::MAX);
                (name, t, created)
            })
            .collect();
        // Decay group (dim >= 2) first, each group latest-created first, then by name.
        named.sort_by(|(a, ta, ca), (b, tb, cb)| {
            (ta.dim() < 2, std::cmp::Reverse(ca), a).cmp(&(tb.dim() < 2, std::cmp::Reverse(cb), b))
        });

        let mut entries = Vec::with_capacity(named.len());
        let mut offset = 0;
        let mut decay_numel = 0;
        for (name, var, created) in &named {
            let entry = FlatEntry { name: name.clone(), offset, shape: var.size(), created: *created };
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
            for ((_, mut var, _), entry) in named.into_iter().zip(&entries) {
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

    /// Has backward call `hook(context, i)` once it has accumulated the gradient of entry `i`
    /// (see [`crate::torch_extras::set_ready_hook`]); `None` removes the hooks set with
    /// `context`.
    ///
    /// # Safety
    /// As [`crate::torch_extras::set_ready_hook`]: `context` must stay valid for `hook` until
    /// the hooks are removed, which the caller must do before it goes.
    pub unsafe fn set_ready_hooks(
        &mut self,
        hook: Option<crate::torch_extras::ReadyFn>,
        context: *const std::ffi::c_void,
    ) -> Result<(), String> {
        for (i, (var, entry)) in self.vars.iter_mut().zip(&self.entries).enumerate() {
            // SAFETY: passed on from the caller.
            unsafe { crate::torch_extras::set_ready_hook(var, hook, context, i as i64) }
                .map_err(|e| format!("hooking the gradient of {}: {e}", entry.name))?;
        }
        Ok(())
    }

    /// For each entry, whether backward from `root` would give it a gradient.
    pub fn reached_by_backward(&self, root: &Tensor) -> Result<Vec<bool>, String> {
        crate::torch_extras::reached_by_backward(root, &self.vars)
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
