//! The shared-memory collective, ranks as threads joined by a real TCP bootstrap ring on
//! 127.0.0.1 and a real `/dev/shm` segment.
//!
//! Reference values are computed directly in the test: the element-wise sum over ranks, in f64,
//! of inputs defined by `input(rank, i)`. Every test runs under a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{PoisonError, RwLock, mpsc};
use std::time::{Duration, Instant};

use common::{input, within};
use rtrain_trainer::collective::{Collective, CollectiveError, ReduceOp, ShmCollective, TcpCollective};
use tch::{Device, Kind, Tensor};

const CONNECT: Duration = Duration::from_secs(10);

/// Held shared by every test that makes a gang, and exclusively by the tests that look for
/// files left in /dev/shm (a gang's files exist briefly while it is set up).
static DEV_SHM: RwLock<()> = RwLock::new(());

/// Runs `f(rank, comm)` for every rank of a fresh group with `slot_bytes` staging slots, each on
/// its own thread.
fn on_ranks<T: Send + 'static>(
    world: usize,
    slot_bytes: usize,
    f: impl Fn(usize, &mut ShmCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let _shared = DEV_SHM.read().unwrap_or_else(PoisonError::into_inner);
    on_ranks_unlocked(world, slot_bytes, f)
}

fn on_ranks_unlocked<T: Send + 'static>(
    world: usize,
    slot_bytes: usize,
    f: impl Fn(usize, &mut ShmCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let group = TcpCollective::loopback_group(world, CONNECT).unwrap();
    let joins: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(rank, tcp)| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut comm = ShmCollective::with_slot_bytes(tcp, slot_bytes).unwrap();
                f(rank, &mut comm)
            })
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}

fn expected(world: usize, i: usize, op: ReduceOp) -> f64 {
    let divisor = if op == ReduceOp::Avg { world as f64 } else { 1.0 };
    (0..world).map(|r| f64::from(input(r, i))).sum::<f64>() / divisor
}

/// Every rank holds the same bits, and they match the direct sum.
fn check(results: &[Vec<f32>], world: usize, op: ReduceOp, offset: usize) {
    for (r, other) in results.iter().enumerate().skip(1) {
        assert!(results[0].iter().zip(other).all(|(a, b)| a.to_bits() == b.to_bits()), "rank {r} differs from rank 0");
    }
    for (i, got) in results[0].iter().enumerate() {
        let want = expected(world, offset + i, op);
        assert!((f64::from(*got) - want).abs() <= 1e-5 * want.abs().max(1.0), "element {i}: {got} vs {want}");
    }
}

#[test]
fn staged_all_reduce_matches_the_direct_sum() {
    within(Duration::from_secs(120), || {
        // 4 KiB slots: many chunks, both slot sets, parts of uneven size.
        for (world, len) in [(2, 1), (2, 10_000), (3, 7_777), (4, 65_536 + 3)] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let results = on_ranks(world, 4096, move |rank, comm| {
                    let mut data: Vec<f32> = (0..len).map(|i| input(rank, i)).collect();
                    comm.all_reduce_f32(&mut data, op).unwrap();
                    // A second call reuses the slots: the same inputs give the same sums.
                    let mut again: Vec<f32> = (0..len).map(|i| input(rank, i)).collect();
                    comm.all_reduce_f32(&mut again, op).unwrap();
                    assert_eq!(data, again);
                    data
                });
                check(&results, world, op, 0);
            }
        }
    });
}

#[test]
fn f64_and_tensors_are_reduced_in_place() {
    within(Duration::from_secs(60), || {
        let results = on_ranks(2, 1 << 20, |rank, comm| {
            let mut data: Vec<f64> = (0..5000).map(|i| f64::from(input(rank, i))).collect();
            comm.all_reduce_f64(&mut data, ReduceOp::Sum).unwrap();
            let values: Vec<f32> = (0..3000).map(|i| input(rank, i)).collect();
            let mut t = Tensor::from_slice(&values);
            let ptr = t.data_ptr();
            comm.all_reduce(&mut t, ReduceOp::Avg).unwrap();
            assert_eq!(t.data_ptr(), ptr, "reduced in the tensor's own memory");
            (data, Vec::<f32>::try_from(&t).unwrap())
        });
        for i in 0..5000 {
            assert_eq!(results[0].0[i].to_bits(), results[1].0[i].to_bits());
            assert!((results[0].0[i] - expected(2, i, ReduceOp::Sum)).abs() < 1e-9);
        }
        let tensors: Vec<Vec<f32>> = results.into_iter().map(|(_, t)| t).collect();
        check(&tensors, 2, ReduceOp::Avg, 0);
    });
}

#[test]
fn shared_buffers_are_reduced_without_staging_whole_or_in_slices() {
    within(Duration::from_secs(60), || {
        for world in [2, 3] {
            let len = 100_003usize;
            let results = on_ranks(world, 4096, move |rank, comm| {
                let shared = comm.shared_zeros(len as i64, Kind::Float).unwrap().expect("a shared buffer");
                assert_eq!((shared.size(), shared.device()), (vec![len as i64], Device::Cpu));
                assert_eq!(Vec::<f32>::try_from(&shared).unwrap().iter().filter(|v| **v != 0.0).count(), 0);
                let values: Vec<f32> = (0..len).map(|i| input(rank, i)).collect();
                let mut whole = shared.shallow_clone();
                whole.copy_(&Tensor::from_slice(&values));
                comm.all_reduce(&mut whole, ReduceOp::Sum).unwrap();
                let summed = Vec::<f32>::try_from(&shared).unwrap();
                // A slice at an offset, as DDP reduces one bucket at a time.
                whole.copy_(&Tensor::from_slice(&values));
                let mut bucket = shared.narrow(0, 1000, 50_000);
                comm.all_reduce(&mut bucket, ReduceOp::Avg).unwrap();
                let after = Vec::<f32>::try_from(&shared).unwrap();
                assert_eq!(&after[..1000], &values[..1000], "outside the slice nothing changes");
                assert_eq!(&after[51_000..], &values[51_000..]);
                // Other tensors, wherever they lie in memory, are still staged.
                let mut plain: Vec<f32> = (0..len).map(|i| input(rank, i)).collect();
                comm.all_reduce_f32(&mut plain, ReduceOp::Sum).unwrap();
                assert_eq!(plain, summed);
                (summed, after[1000..51_000].to_vec())
            });
            let (sums, buckets): (Vec<_>, Vec<_>) = results.into_iter().unzip();
            check(&sums, world, ReduceOp::Sum, 0);
            check(&buckets, world, ReduceOp::Avg, 1000);
        }
    });
}

/// Files of this process left in /dev/shm.
fn our_shm_files() -> Vec<String> {
    let prefix = format!("rtrain-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn no_segment_is_left_in_dev_shm() {
    within(Duration::from_secs(60), || {
        let _exclusive = DEV_SHM.write().unwrap_or_else(PoisonError::into_inner);
        on_ranks_unlocked(2, 4096, |_, comm| {
            let mut shared = comm.shared_zeros(1000, Kind::Float).unwrap().expect("a shared buffer");
            comm.all_reduce(&mut shared, ReduceOp::Sum).unwrap();
        });
        // A rank that leaves before the others set up shared buffers: they fail, and clean up.
        let results = on_ranks_unlocked(3, 4096, |rank, comm| {
            comm.set_timeout(Duration::from_secs(60));
            if rank == 2 {
                return Ok(None);
            }
            comm.shared_zeros(1000, Kind::Float)
        });
        assert!(results[0].is_err() && results[1].is_err(), "{results:?}");
        let left = our_shm_files();
        assert!(left.is_empty(), "left behind: {left:?}");
    });
}

#[test]
fn a_peer_that_dies_is_an_error_at_once_not_at_the_timeout() {
    within(Duration::from_secs(30), || {
        let results = on_ranks(2, 4096, |rank, comm| {
            comm.set_timeout(Duration::from_secs(60));
            if rank == 1 {
                // Leaves without reducing: its TCP links close as a killed process's would.
                return Ok(Duration::ZERO);
            }
            let started = Instant::now();
            let mut data = vec![1.0f32; 10_000];
            comm.all_reduce_f32(&mut data, ReduceOp::Sum).map(|()| started.elapsed())
        });
        match &results[0] {
            Err(CollectiveError::Io { peer: 1, .. }) => {}
            other => panic!("expected an error naming rank 1, got {other:?}"),
        }
        // Once failed, the communicator refuses further calls instead of hanging.
    });
}

#[test]
fn a_silent_peer_times_out() {
    within(Duration::from_secs(30), || {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let results = on_ranks(2, 4096, move |rank, comm| {
            comm.set_timeout(Duration::from_millis(300));
            if rank == 1 {
                // Alive, connections open, but never calls: wait until rank 0 has given up.
                let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(20));
                return Ok(());
            }
            let mut data = vec![1.0f32; 100];
            let result = comm.all_reduce_f32(&mut data, ReduceOp::Sum);
            let _ = tx.send(());
            let again = comm.all_reduce_f32(&mut data, ReduceOp::Sum);
            assert!(again.is_err(), "a broken communicator refuses further calls");
            result
        });
        assert!(matches!(results[0], Err(CollectiveError::Timeout { peer: 1, .. })), "{:?}", results[0]);
    });
}

#[test]
fn a_rank_that_drops_out_fails_every_peer_long_before_the_timeout() {
    // The timeout is 60 s and the test must end within 30 s. Rank 2 leaves while the others wait
    // in the all-reduce: its sockets close and its memory goes, as a killed process's would
    // (nothing is poisoned on its behalf). Ranks 1 and 3 are its ring neighbours and notice;
    // rank 0 is not, and must hear it from them.
    within(Duration::from_secs(30), || {
        let results = on_ranks(4, 4096, |rank, comm| {
            comm.set_timeout(Duration::from_secs(60));
            if rank == 2 {
                std::thread::sleep(Duration::from_millis(200));
                return None;
            }
            let mut data = vec![1.0f32; 100_000];
            Some(comm.all_reduce_f32(&mut data, ReduceOp::Sum))
        });
        for (rank, result) in results.iter().enumerate().filter(|(r, _)| *r != 2) {
            match result {
                Some(Err(CollectiveError::Io { .. })) => {}
                other => panic!("rank {rank}: expected an error about the lost peer, got {other:?}"),
            }
        }
    });
}

#[test]
fn a_rank_that_fails_fails_every_peer_long_before_the_timeout() {
    // Rank 2 is alive but never calls; rank 1 gives up after 300 ms. Ranks 0 and 3 wait up to 60 s
    // for rank 2 themselves, but must fail as soon as rank 1 has.
    within(Duration::from_secs(30), || {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let results = on_ranks(4, 4096, move |rank, comm| {
            comm.set_timeout(if rank == 1 { Duration::from_millis(300) } else { Duration::from_secs(60) });
            if rank == 2 {
                // Stays alive, links open, until the three others have returned.
                let rx = rx.lock().unwrap();
                for _ in 0..3 {
                    let _ = rx.recv_timeout(Duration::from_secs(25));
                }
                return None;
            }
            let mut data = vec![1.0f32; 1000];
            let result = comm.all_reduce_f32(&mut data, ReduceOp::Sum).map_err(|e| e.to_string());
            let _ = tx.send(());
            Some(result)
        });
        let err = |r: usize| results[r].clone().unwrap().unwrap_err();
        assert!(err(1).contains("timed out"), "{}", err(1));
        for rank in [0, 3] {
            assert!(!err(rank).contains("timed out after 60s"), "rank {rank}: {}", err(rank));
        }
    });
}

#[test]
fn ranks_that_disagree_on_the_call_fail_with_a_message() {
    within(Duration::from_secs(30), || {
        let results = on_ranks(2, 4096, |rank, comm| {
            comm.set_timeout(Duration::from_secs(5));
            let mut data = vec![1.0f32; 1000 + rank];
            comm.all_reduce_f32(&mut data, ReduceOp::Sum).map_err(|e| e.to_string())
        });
        for r in &results {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("ranks disagree") && e.contains("same collective calls"), "{e}");
        }
    });
}

#[test]
fn a_world_of_one_is_a_no_op_and_has_no_shared_buffer() {
    within(Duration::from_secs(30), || {
        let results = on_ranks(1, 4096, |_, comm| {
            let mut data = vec![2.5f32; 10];
            comm.all_reduce_f32(&mut data, ReduceOp::Avg).unwrap();
            (data, comm.shared_zeros(10, Kind::Float).unwrap().is_none())
        });
        assert_eq!(results[0], (vec![2.5f32; 10], true));
    });
}

#[test]
fn ddp_gradients_live_in_shared_memory_and_are_averaged() {
    use rtrain_trainer::ddp::Ddp;
    use rtrain_trainer::model::GptConfig;
    use tch::nn;
    const TINY: GptConfig = GptConfig { vocab_size: 256, n_ctx: 16, n_layer: 1, n_head: 2, n_embd: 32 };
    within(Duration::from_secs(60), || {
        let results = on_ranks(2, 4096, |rank, comm| {
            tch::manual_seed(rank as i64); // different initial weights: Ddp broadcasts rank 0's
            let vs = nn::VarStore::new(Device::Cpu);
            let model = TINY.init(&vs.root());
            let mut ddp = Ddp::new(&vs, comm, 1 << 12).unwrap();
            assert!(comm.holds(ddp.params().grads()), "the gradient buffer is shared memory");
            let x = Tensor::from_slice(&(0..32).map(|i| ((i * 7 + rank * 13) % 256) as i64).collect::<Vec<_>>())
                .view([2, 16]);
            model.loss(&x, &x).backward();
            // This rank's own gradient, then the average over both ranks (buckets of 1 KiB).
            ddp.params_mut().gather_grads();
            let own = Vec::<f32>::try_from(&ddp.params().grads().copy()).unwrap();
            ddp.sync_grads(comm).unwrap();
            (own, Vec::<f32>::try_from(ddp.params().grads()).unwrap())
        });
        let (own0, avg0) = &results[0];
        let (own1, avg1) = &results[1];
        assert_ne!(own0, own1, "the ranks saw different data");
        assert_eq!(avg0, avg1);
        for i in 0..own0.len() {
            let want = (own0[i] + own1[i]) / 2.0;
            assert!((avg0[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "{i}: {} vs {want}", avg0[i]);
        }
    });
}

#[test]
fn a_peer_that_leaves_right_after_the_last_barrier_is_not_an_error() {
    // Rank 0 passes the barrier, returns and closes its links while rank 1 may still be looking
    // at the barrier: a rank that arrived and then left has not failed anyone.
    within(Duration::from_secs(120), || {
        for _ in 0..100 {
            let results = on_ranks(4, 4096, |_, comm| {
                let mut data = vec![1.0f32; 1000];
                comm.all_reduce_f32(&mut data, ReduceOp::Sum).map_err(|e| e.to_string())
            });
            for r in results {
                r.unwrap();
            }
        }
    });
}
