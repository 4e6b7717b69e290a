//! Stand-in for the `nccl` backend when rtrain is built without the `nccl` feature: the same
//! API, whose constructor reports how to get the real one.

use std::convert::Infallible;
use std::time::Duration;

use tch::Tensor;

use super::{Collective, CollectiveError, ReduceOp};

const REASON: &str = "rtrain was built without the nccl feature; rebuild with --features nccl";

/// Never constructed: [`NcclCollective::new`] always returns [`CollectiveError::Unavailable`].
#[derive(Debug)]
pub struct NcclCollective {
    never: Infallible,
}

impl NcclCollective {
    /// Always `Unavailable` in this build.
    pub fn probe() -> Result<(), CollectiveError> {
        Err(CollectiveError::Unavailable { backend: "nccl", reason: REASON.into() })
    }

    /// Always `Unavailable` in this build.
    pub fn new(
        _rank: usize,
        _world: usize,
        _device_index: usize,
        _bootstrap: &mut dyn Collective,
        _timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        Err(CollectiveError::Unavailable { backend: "nccl", reason: REASON.into() })
    }

    pub fn set_timeout(&mut self, _timeout: Duration) {
        match self.never {}
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        match self.never {}
    }

    fn world_size(&self) -> usize {
        match self.never {}
    }

    fn all_reduce(&mut self, _tensor: &mut Tensor, _op: ReduceOp) -> Result<(), CollectiveError> {
        match self.never {}
    }

    fn broadcast(&mut self, _tensor: &mut Tensor, _root: usize) -> Result<(), CollectiveError> {
        match self.never {}
    }

    fn all_gather(&mut self, _input: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        match self.never {}
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::TcpCollective;

    #[test]
    fn stub_reports_how_to_get_nccl() {
        let mut bootstrap = TcpCollective::loopback_group(1, Duration::from_secs(1)).unwrap().remove(0);
        let err = NcclCollective::new(0, 1, 0, &mut bootstrap, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, CollectiveError::Unavailable { backend: "nccl", .. }));
        assert!(err.to_string().contains("--features nccl"), "{err}");
    }
}
