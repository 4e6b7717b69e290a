//! A collective that knows which ranks share a host: an all-reduce first sums within each host
//! (shared memory), then one leader per host (its lowest rank) runs the ring across hosts, and
//! each leader hands the result back to its host. Across H hosts of L ranks each, a rank's
//! traffic over the network is the ring's 2·(H−1)/H of the buffer, sent by the leader alone,
//! instead of a flat ring over all H·L ranks, where every hop between hosts carries it.
//!
//! It is built on the gang's flat TCP ring, which also carries its broadcasts, gathers and
//! barriers, and which exchanges the addresses of the rings inside hosts and between leaders.

use std::time::Duration;

use tch::{Kind, Tensor};

use super::shm::DEFAULT_SLOT_BYTES;
use super::{Collective, CollectiveError, ReduceOp, ShmCollective, TcpCollective};

/// Room for one published `host:port` address in the exchange.
const ADDR_BYTES: usize = 128;

pub struct HierarchicalCollective {
    rank: usize,
    world: usize,
    /// The ranks of this host: shared memory, or TCP where /dev/shm cannot hold it.
    local: Box<dyn Collective>,
    /// The ring between the hosts' leaders, on a leader of a job of several hosts.
    leaders: Option<TcpCollective>,
    /// Every rank of the gang.
    flat: TcpCollective,
    hosts: usize,
}

/// Where each rank is: the host it is on, its index among that host's ranks, and the hosts in
/// order of their lowest rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Per rank: the index of its host in order of first appearance.
    pub host_of: Vec<usize>,
}

impl Topology {
    /// From any per-rank host labels (names or numbers as given).
    pub fn from_labels<T: PartialEq>(labels: &[T]) -> Self {
        let mut seen: Vec<&T> = Vec::new();
        let host_of = labels
            .iter()
            .map(|label| match seen.iter().position(|s| *s == label) {
                Some(i) => i,
                None => {
                    seen.push(label);
                    seen.len() - 1
                }
            })
            .collect();
        Self { host_of }
    }

    pub fn hosts(&self) -> usize {
        self.host_of.iter().max().map_or(0, |h| h + 1)
    }

    /// The ranks on host `host`, in rank order.
    pub fn ranks_on(&self, host: usize) -> Vec<usize> {
        (0..self.host_of.len()).filter(|&r| self.host_of[r] == host).collect()
    }
}

impl HierarchicalCollective {
    /// Builds the rings inside hosts and between them over the connected gang `flat`. `host` is
    /// this rank's host label (every rank passes its own; equal labels share a host), `bind_host`
    /// the address the new rings listen on, `session` the gang's (the attempt), and every rank
    /// calls this together.
    pub fn new(
        mut flat: TcpCollective,
        host: u64,
        bind_host: &str,
        token: &str,
        session: u64,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let (rank, world) = (flat.rank(), flat.world_size());
        let mut labels = vec![0u8; 8 * world];
        flat.all_gather_bytes(&host.to_le_bytes(), &mut labels)?;
        let labels: Vec<u64> =
            labels.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        let topology = Topology::from_labels(&labels);
        let here = topology.ranks_on(topology.host_of[rank]);
        let local_rank = here.iter().position(|&r| r == rank).unwrap_or(0);
        let hosts = topology.hosts();
        let leads = local_rank == 0 && hosts > 1;

        let bind_err = |source| CollectiveError::Io { op: "bind", peer: rank, source };
        let local_point = TcpCollective::bind(bind_host).map_err(bind_err)?;
        let leader_point = if leads { Some(TcpCollective::bind(bind_host).map_err(bind_err)?) } else { None };
        // Both addresses of every rank, over the flat ring.
        let mut mine = [0u8; 2 * ADDR_BYTES];
        put_addr(&mut mine[..ADDR_BYTES], local_point.addr(), rank)?;
        if let Some(point) = &leader_point {
            put_addr(&mut mine[ADDR_BYTES..], point.addr(), rank)?;
        }
        let mut all = vec![0u8; 2 * ADDR_BYTES * world];
        flat.all_gather_bytes(&mine, &mut all)?;
        let addr = |r: usize, which: usize| {
            let at = r * 2 * ADDR_BYTES + which * ADDR_BYTES;
            let field = &all[at..at + ADDR_BYTES];
            String::from_utf8_lossy(&field[..field.iter().position(|&b| b == 0).unwrap_or(ADDR_BYTES)]).into_owned()
        };

        // Sessions apart from the flat ring's, so no connection can join the wrong ring.
        let local_peers: Vec<String> = here.iter().map(|&r| addr(r, 0)).collect();
        let local_tcp = local_point.with_session(session.wrapping_mul(4).wrapping_add(1)).connect(
            local_rank,
            &local_peers,
            token,
            timeout,
        )?;
        let local: Box<dyn Collective> = match ShmCollective::try_new(local_tcp, DEFAULT_SLOT_BYTES) {
            Ok(shm) => Box::new(shm),
            Err((e @ CollectiveError::Unavailable { .. }, tcp)) => {
                tracing::warn!(reason = %e, "shared memory is unavailable within the host; using tcp there");
                Box::new(tcp)
            }
            Err((e, _)) => return Err(e),
        };
        let leaders = match leader_point {
            Some(point) => {
                let leader_ranks: Vec<usize> = (0..hosts).map(|h| topology.ranks_on(h)[0]).collect();
                let peers: Vec<String> = leader_ranks.iter().map(|&r| addr(r, 1)).collect();
                let index = topology.host_of[rank];
                Some(
                    point
                        .with_session(session.wrapping_mul(4).wrapping_add(2))
                        .connect(index, &peers, token, timeout)?,
                )
            }
            None => None,
        };
        Ok(Self { rank, world, local, leaders, flat, hosts })
    }

    /// Hosts in the gang.
    pub fn hosts(&self) -> usize {
        self.hosts
    }
}

/// Elements per piece of a pipelined all-reduce: an eighth of the buffer, between 256 KiB and
/// 4 MiB of f32, so the phases overlap over most of a gradient bucket while each piece's ring
/// still runs at the link's rate. Buffers under two of the smallest pieces are not split.
const MIN_PIECE: i64 = 1 << 16;
const MAX_PIECE: i64 = 1 << 20;

fn piece_len(numel: i64) -> i64 {
    (numel / 8).clamp(MIN_PIECE, MAX_PIECE)
}

impl HierarchicalCollective {
    /// Sums a large contiguous `tensor` piece by piece, overlapping the phases: while the leader's
    /// ring sends piece i between hosts (on a thread of its own), the host already sums piece
    /// i+1 over shared memory and hands out piece i−1. Every rank of a host issues the same
    /// local operations in the same order (sum i, then hand out i−1), the leader waiting for the
    /// ring to finish a piece before handing it out.
    fn pipelined_sum(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let flat = tensor.view(-1);
        let numel = flat.numel() as i64;
        let piece = piece_len(numel);
        let pieces: Vec<Tensor> =
            (0..(numel + piece - 1) / piece).map(|i| flat.narrow(0, i * piece, piece.min(numel - i * piece))).collect();
        let local = self.local.as_mut();
        std::thread::scope(|scope| {
            let (to_ring, ring_rx) = std::sync::mpsc::channel::<Tensor>();
            let (done_tx, done) = std::sync::mpsc::channel::<Result<(), CollectiveError>>();
            let ring = self.leaders.as_mut().map(|leaders| {
                scope.spawn(move || {
                    for mut piece in ring_rx {
                        let result = leaders.all_reduce(&mut piece, ReduceOp::Sum);
                        let failed = result.is_err();
                        if done_tx.send(result).is_err() || failed {
                            return;
                        }
                    }
                })
            });
            let leads = ring.is_some();
            let lost_ring = || CollectiveError::Unavailable {
                backend: "hierarchical",
                reason: "the ring between hosts stopped".into(),
            };
            let hand_out = |local: &mut dyn Collective, piece: &Tensor| -> Result<(), CollectiveError> {
                if leads {
                    done.recv().map_err(|_| lost_ring())??;
                }
                local.broadcast(&mut piece.shallow_clone(), 0)
            };
            let mut result = Ok(());
            for (i, piece) in pieces.iter().enumerate() {
                result = local.all_reduce(&mut piece.shallow_clone(), ReduceOp::Sum);
                if result.is_ok() && leads && to_ring.send(piece.shallow_clone()).is_err() {
                    result = Err(lost_ring());
                }
                if result.is_ok() && i > 0 {
                    result = hand_out(&mut *local, &pieces[i - 1]);
                }
                if result.is_err() {
                    break;
                }
            }
            if result.is_ok()
                && let Some(last) = pieces.last()
            {
                result = hand_out(&mut *local, last);
            }
            drop(to_ring);
            if let Some(ring) = ring {
                let _ = ring.join();
            }
            result
        })
    }
}

/// Writes `addr` zero-padded into `field`.
fn put_addr(field: &mut [u8], addr: &str, rank: usize) -> Result<(), CollectiveError> {
    let bytes = addr.as_bytes();
    if bytes.len() >= field.len() {
        return Err(CollectiveError::Io {
            op: "bind",
            peer: rank,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("address `{addr}` is too long")),
        });
    }
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

impl Collective for HierarchicalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError> {
        let numel = tensor.numel() as i64;
        if self.hosts > 1 && tensor.is_contiguous() && numel >= 2 * MIN_PIECE {
            self.pipelined_sum(tensor)?;
        } else {
            self.local.all_reduce(tensor, ReduceOp::Sum)?;
            if let Some(leaders) = self.leaders.as_mut() {
                leaders.all_reduce(tensor, ReduceOp::Sum)?;
            }
            // Every rank ends with its leader's bits.
            self.local.broadcast(tensor, 0)?;
        }
        if op == ReduceOp::Avg {
            tch::no_grad(|| {
                let _ = tensor.g_div_scalar_(self.world as f64);
            });
        }
        Ok(())
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.flat.broadcast(tensor, root)
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        self.flat.all_gather(input)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.flat.barrier()
    }

    fn shared_zeros(&mut self, numel: i64, kind: Kind) -> Result<Option<Tensor>, CollectiveError> {
        // Gradients go through the host's shared memory first: its buffers serve.
        self.local.shared_zeros(numel, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_numbered_in_order_of_their_first_rank() {
        let t = Topology::from_labels(&["b", "b", "a", "c", "a"]);
        assert_eq!(t.host_of, [0, 0, 1, 2, 1]);
        assert_eq!(t.hosts(), 3);
        assert_eq!(t.ranks_on(1), [2, 4]);
    }
}
