//! Data-parallel gradient synchronisation: every rank starts from rank 0's parameters, and
//! after backward the flat gradient buffer is averaged across ranks bucket by bucket.

use tch::nn::VarStore;

use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::optim::FlatParams;

/// One rank's side of DDP: owns the flat parameter and gradient buffers.
pub struct Ddp {
    params: FlatParams,
    bucket_elems: i64,
}

impl Ddp {
    /// Flattens `vs` and broadcasts rank 0's parameters, so all ranks start identical. The
    /// gradient buffer is the collective's shared memory where it has some (no staging copies).
    pub fn new(vs: &VarStore, collective: &mut dyn Collective, bucket_bytes: usize) -> Result<Self, CollectiveError> {
        let mut params = FlatParams::new(vs);
        if let Some(shared) = collective.shared_zeros(params.grads().numel() as i64, params.grads().kind())? {
            params.set_grad_buffer(shared);
        }
        if collective.world_size() > 1 {
            let mut flat = params.params().shallow_clone();
            tch::no_grad(|| collective.broadcast(&mut flat, 0))?;
        }
        let elem = params.params().kind().elt_size_in_bytes() as i64;
        Ok(Self { params, bucket_elems: (bucket_bytes as i64 / elem).max(1) })
    }

    pub fn params(&self) -> &FlatParams {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut FlatParams {
        &mut self.params
    }

    /// Averages the accumulated gradients (already in the flat buffer, see
    /// [`FlatParams::gather_grads`]) across ranks (sync point: every rank must call this in the
    /// same step).
    pub fn sync_grads(&mut self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        self.params.gather_grads();
        if collective.world_size() == 1 {
            return Ok(());
        }
        let grads = self.params.grads().shallow_clone();
        let total = grads.numel() as i64;
        let mut offset = 0;
        while offset < total {
            let len = self.bucket_elems.min(total - offset);
            // A 1-D slice of a contiguous buffer is contiguous: the backend reduces it in place.
            let mut bucket = grads.narrow(0, offset, len);
            collective.all_reduce(&mut bucket, ReduceOp::Avg)?;
            offset += len;
        }
        Ok(())
    }
}
