//! The key/value cache of one attention layer, for generation.

use tch::Tensor;

/// Keys and values of one layer for the positions seen so far, in buffers
/// `[B, kv_heads, capacity, head_dim]` allocated once, so a decoding step copies only its own
/// keys and values.
#[derive(Debug, Default)]
pub struct LayerKv {
    buffers: Option<(Tensor, Tensor)>,
    len: i64,
    capacity: i64,
}

impl LayerKv {
    /// A cache for sequences of up to `capacity` positions (it grows if they get longer).
    pub fn with_capacity(capacity: i64) -> Self {
        Self { buffers: None, len: 0, capacity }
    }

    /// Appends `k` and `v` (`[B, kv_heads, T, head_dim]`); returns views of everything cached.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let needed = self.len + t;
        let buffers = match self.buffers.take() {
            Some(b) if needed <= self.capacity => b,
            old => {
                let capacity = needed.max(self.capacity).max(2 * self.len);
                let mut shape = k.size();
                shape[2] = capacity;
                let options = (k.kind(), k.device());
                let (nk, nv) = (Tensor::zeros(shape.as_slice(), options), Tensor::zeros(shape.as_slice(), options));
                if let Some((ok, ov)) = old {
                    nk.narrow(2, 0, self.len).copy_(&ok.narrow(2, 0, self.len));
                    nv.narrow(2, 0, self.len).copy_(&ov.narrow(2, 0, self.len));
                }
                self.capacity = capacity;
                (nk, nv)
            }
        };
        let (bk, bv) = self.buffers.insert(buffers);
        bk.narrow(2, self.len, t).copy_(k);
        bv.narrow(2, self.len, t).copy_(v);
        self.len = needed;
        (bk.narrow(2, 0, needed), bv.narrow(2, 0, needed))
    }

    /// Repeats each cached sequence `times` times along the batch (row r becomes rows
    /// r * times .. (r + 1) * times), so samples of one prompt continue from its single prefill.
    /// Copies the whole buffer once, capacity included.
    pub(crate) fn repeat_rows(&mut self, times: i64) {
        if let Some((k, v)) = self.buffers.take() {
            self.buffers =
                Some((k.repeat_interleave_self_int(times, 0, None), v.repeat_interleave_self_int(times, 0, None)));
        }
    }
}
