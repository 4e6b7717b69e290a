//! How a gang agrees to create an NCCL communicator, over the real TCP ring on 127.0.0.1 with
//! ranks as threads: the unique-id exchange and the readiness vote need no GPU or NCCL. And on
//! this machine (no NVIDIA driver, no NCCL) `NcclCollective::new` fails every rank at once with a
//! message, as a failure that is not retried (not infrastructure). Every test runs under a deadline.

use std::sync::mpsc;
use std::time::Duration;

use rtrain_trainer::TrainError;
use rtrain_trainer::collective::nccl_bootstrap::{InitReadiness, NCCL_ID_BYTES, agree_on_nccl_id};
use rtrain_trainer::collective::{Collective, CollectiveError, NcclCollective, TcpCollective};

const CONNECT: Duration = Duration::from_secs(10);
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `f(rank, comm)` for every rank of a fresh loopback group, each on its own thread, and
/// returns the results by rank; fails the test if a rank takes longer than the deadline.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &mut TcpCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let group = TcpCollective::loopback_group(world, CONNECT).unwrap();
    let (tx, rx) = mpsc::channel();
    for (rank, mut comm) in group.into_iter().enumerate() {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send((rank, f(rank, &mut comm)));
        });
    }
    let mut results: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let (rank, value) = rx.recv_timeout(DEADLINE).expect("every rank finishes within the deadline");
        results[rank] = Some(value);
    }
    results.into_iter().map(|r| r.unwrap()).collect()
}

fn id(seed: u8) -> [u8; NCCL_ID_BYTES] {
    std::array::from_fn(|i| seed.wrapping_add(i as u8).wrapping_mul(31))
}

fn vote(world: usize, readiness: impl Fn(usize) -> InitReadiness + Send + Sync + Clone + 'static) -> Vec<String> {
    on_ranks(world, move |rank, comm| match agree_on_nccl_id(comm, readiness(rank)) {
        Ok(id) => format!("id {:?}", &id[..4]),
        Err(e) => {
            assert!(matches!(e, CollectiveError::Unavailable { backend: "nccl", .. }), "{e}");
            let text = e.to_string();
            assert!(!TrainError::from(e).is_infrastructure());
            text
        }
    })
}

#[test]
fn every_rank_gets_rank_zeros_id() {
    for world in [1, 2, 4] {
        let results = on_ranks(world, |rank, comm| {
            // Ids from other ranks are ignored.
            let mine = if rank == 0 { Some(id(7)) } else { Some(id(rank as u8 + 100)) };
            agree_on_nccl_id(comm, Ok(mine)).unwrap()
        });
        assert!(results.iter().all(|got| *got == id(7)), "world {world}");
    }
}

#[test]
fn one_failing_rank_fails_every_rank_with_its_message() {
    let results = vote(3, |rank| match rank {
        0 => Ok(Some(id(1))),
        1 => Ok(None),
        _ => Err("CUDA device 2 was requested, but only 2 are visible".into()),
    });
    for r in &results {
        assert_eq!(
            r, "backend nccl is not available: rank 2: CUDA device 2 was requested, but only 2 are visible",
            "every rank reports the same message"
        );
    }
}

#[test]
fn failures_of_several_ranks_are_all_named_in_rank_order() {
    let results = vote(4, |rank| match rank {
        0 => Err("no libnccl.so.2".into()),
        3 => Err(String::new()),
        1 => Ok(None),
        _ => Ok(None),
    });
    assert!(results.iter().all(|r| r == &results[0]));
    assert!(results[0].ends_with("rank 0: no libnccl.so.2; rank 3: no reason given"), "{}", results[0]);
}

#[test]
fn ranks_failing_alike_are_named_once() {
    let results = vote(3, |rank| match rank {
        1 => Ok(None),
        _ => Err("no NVIDIA driver".into()),
    });
    assert!(results.iter().all(|r| r == "backend nccl is not available: ranks 0, 2: no NVIDIA driver"), "{results:?}");
}

#[test]
fn nccl_init_on_a_machine_without_it_fails_every_rank_without_hanging() {
    let results = on_ranks(2, |rank, comm| {
        NcclCollective::new(rank, 2, rank, comm, Duration::from_secs(5)).map(|_| ()).unwrap_err()
    });
    let messages: Vec<String> = results.iter().map(|e| e.to_string()).collect();
    for e in results {
        assert!(matches!(e, CollectiveError::Unavailable { backend: "nccl", .. }), "{e}");
        assert!(!TrainError::from(e).is_infrastructure());
    }
    assert_eq!(messages[0], messages[1]);
    // The stub says how to build with NCCL; the real backend, what it looked for on each rank.
    let m = &messages[0];
    eprintln!("{m}");
    assert!(m.contains("--features nccl") || m.contains("ranks 0, 1: "), "{m}");
    if cfg!(feature = "nccl") {
        // No libtorch_cuda.so here, so the CUDA check fails first, before NCCL is looked for.
        assert!(m.contains("libtorch_cuda.so") && m.contains("use device cpu"), "{m}");
    }
}

#[test]
fn a_bootstrap_of_another_size_is_refused() {
    let results = on_ranks(2, |rank, comm| {
        NcclCollective::new(rank, 3, rank, comm as &mut dyn Collective, Duration::from_secs(5)).map(|_| ()).unwrap_err()
    });
    for e in results {
        let text = e.to_string();
        assert!(text.contains("nccl init") || text.contains("--features nccl"), "{text}");
    }
}
