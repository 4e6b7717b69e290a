//! DDP's gradient all-reduce overlapped with backward, on real ranks over loopback (threads of
//! this process, each with its own TCP or shared-memory collective): it gives the bits of the
//! all-reduce after backward, starts most buckets while backward still runs, and every rank lays
//! its gradients out as rank 0 does, whatever order it built its variables in.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{BACKENDS, on_backend, within};
use rtrain_trainer::collective::Collective;
use rtrain_trainer::ddp::Ddp;
use rtrain_trainer::model::GptConfig;
use tch::{Device, Kind, Tensor, nn};

const TINY: GptConfig = GptConfig { vocab_size: 256, n_ctx: 16, n_layer: 3, n_head: 2, n_embd: 32 };
const TIMEOUT: Duration = Duration::from_secs(30);

fn grads(ddp: &Ddp) -> Vec<u32> {
    Vec::<f32>::try_from(ddp.params().grads()).unwrap().into_iter().map(f32::to_bits).collect()
}

/// Rank `rank`'s batch of two sequences.
fn tokens(rank: usize) -> Tensor {
    Tensor::from_slice(&(0..32).map(|i| ((i * 7 + rank * 13) % 256) as i64).collect::<Vec<_>>()).view([2, 16])
}

#[test]
fn the_overlapped_all_reduce_gives_the_bits_of_the_one_after_backward() {
    for backend in BACKENDS {
        let results = within(Duration::from_secs(120), move || {
            on_backend(backend, 2, TIMEOUT, |rank, comm: &mut dyn Collective| {
                tch::manual_seed(rank as i64); // different initial weights: Ddp broadcasts rank 0's
                let vs = nn::VarStore::new(Device::Cpu);
                let model = TINY.init(&vs.root());
                // 4 KiB buckets: a few dozen of them for this model.
                let mut ddp = Ddp::new(&vs, comm, 4096).unwrap();
                let x = tokens(rank);

                model.loss(&x, &x).backward();
                ddp.sync_grads(comm).unwrap();
                let after = grads(&ddp);

                ddp.params_mut().zero_grads();
                let loss = model.loss(&x, &x);
                let (_, synced) = ddp.sync_grads_during(comm, &loss, || loss.backward());
                synced.unwrap();
                (after, grads(&ddp), ddp.overlapped_buckets(), ddp.buckets().len())
            })
        });
        let (after0, during0, overlapped, buckets) = &results[0];
        assert!(*buckets >= 12, "{backend:?}: only {buckets} buckets");
        for (rank, (after, during, _, _)) in results.iter().enumerate() {
            assert!(after.iter().any(|&g| g != 0), "{backend:?}: rank {rank} has no gradient");
            assert_eq!(after, during, "{backend:?}: rank {rank}: overlapped and after-backward differ");
            assert_eq!(during, during0, "{backend:?}: rank {rank} ends unlike rank 0");
        }
        assert_eq!(after0, &results[1].0);
        // Every bucket starts from backward's hooks (the last when the token embedding, used
        // first and so finished last, is done); none is left for after backward.
        assert_eq!(overlapped, buckets, "{backend:?}: buckets started during backward");
        assert!(results.iter().all(|r| r.2 == *overlapped), "{backend:?}: the ranks overlapped differently");
    }
}

#[test]
fn a_rank_that_syncs_after_backward_meets_one_that_overlaps() {
    let results = within(Duration::from_secs(60), || {
        on_backend(BACKENDS[1], 2, TIMEOUT, |rank, comm: &mut dyn Collective| {
            tch::manual_seed(7);
            let vs = nn::VarStore::new(Device::Cpu);
            let model = TINY.init(&vs.root());
            let mut ddp = Ddp::new(&vs, comm, 4096).unwrap();
            let x = tokens(rank);
            for _ in 0..2 {
                ddp.params_mut().zero_grads();
                if rank == 0 {
                    let loss = model.loss(&x, &x);
                    ddp.sync_grads_during(comm, &loss, || loss.backward()).1.unwrap();
                } else {
                    // A rank whose last micro-batch is empty: its backward came earlier.
                    model.loss(&x, &x).backward();
                    ddp.sync_grads(comm).unwrap();
                }
            }
            grads(&ddp)
        })
    });
    assert!(results[0].iter().any(|&g| g != 0));
    assert_eq!(results[0], results[1]);
}

#[test]
fn ranks_that_built_their_variables_in_another_order_take_rank_0s_layout_and_unused_ones_wait_for_nothing() {
    let results = within(Duration::from_secs(60), || {
        on_backend(BACKENDS[0], 2, TIMEOUT, |rank, comm: &mut dyn Collective| {
            let vs = nn::VarStore::new(Device::Cpu);
            let mut names = ["a", "b", "c"];
            if rank == 1 {
                names.reverse();
            }
            let vars: Vec<Tensor> =
                names.iter().map(|n| vs.root().var(n, &[3], nn::Init::Const(rank as f64 + 1.0))).collect();
            // Created last, so first in the layout and in the all-reduce order, but never used.
            let _unused = vs.root().var("d", &[3], nn::Init::Const(0.0));
            // 4-byte buckets: one variable each.
            let mut ddp = Ddp::new(&vs, comm, 4).unwrap();
            let layout: Vec<String> = ddp.params().entries().iter().map(|e| e.name.clone()).collect();
            // Each variable's gradient is its position in the name order, times the rank + 1.
            let loss = vars
                .iter()
                .zip(names)
                .map(|(v, n)| v.sum(Kind::Float) * f64::from(n.as_bytes()[0] - b'a' + 1) * (rank as f64 + 1.0))
                .reduce(|a, b| a + b)
                .unwrap();
            ddp.sync_grads_during(comm, &loss, || loss.backward()).1.unwrap();
            let values = Vec::<f32>::try_from(ddp.params().params()).unwrap();
            (layout, values, Vec::<f32>::try_from(ddp.params().grads()).unwrap(), ddp.overlapped_buckets())
        })
    });
    // Rank 0 built a, b, c, d: d leads.
    assert_eq!(results[0].0, ["d", "c", "b", "a"]);
    assert_eq!(results[1].0, results[0].0);
    assert_eq!(results[1].1[3..], [1.0; 9], "rank 1 starts from rank 0's values");
    // The average over ranks of position × (rank + 1): c 3 × 1.5, b 2 × 1.5, a 1 × 1.5.
    for (rank, r) in results.iter().enumerate() {
        assert_eq!(r.2, [0.0, 0.0, 0.0, 4.5, 4.5, 4.5, 3.0, 3.0, 3.0, 1.5, 1.5, 1.5], "rank {rank}");
        // d's bucket, first in line, did not hold the others back until backward returned.
        assert_eq!(r.3, 4, "rank {rank}: buckets started during backward");
    }
}

#[test]
fn dropping_an_older_ddp_leaves_the_newer_ones_hooks() {
    let results = within(Duration::from_secs(60), || {
        on_backend(BACKENDS[0], 2, TIMEOUT, |rank, comm: &mut dyn Collective| {
            tch::manual_seed(3);
            let vs = nn::VarStore::new(Device::Cpu);
            let model = TINY.init(&vs.root());
            let older = Ddp::new(&vs, comm, 4096).unwrap();
            let mut newer = Ddp::new(&vs, comm, 4096).unwrap();
            drop(older);
            let x = tokens(rank);
            let loss = model.loss(&x, &x);
            newer.sync_grads_during(comm, &loss, || loss.backward()).1.unwrap();
            let counts = (newer.overlapped_buckets(), newer.buckets().len());
            drop(newer);
            // No hook is left pointing at the dropped state.
            model.loss(&x, &x).backward();
            counts
        })
    });
    for (overlapped, buckets) in results {
        assert_eq!(overlapped, buckets, "the newer Ddp's buckets started during backward");
    }
}

#[test]
fn a_gradient_that_comes_after_its_bucket_was_reduced_is_an_error() {
    let results = within(Duration::from_secs(60), || {
        on_backend(BACKENDS[0], 2, TIMEOUT, |_, comm: &mut dyn Collective| {
            let vs = nn::VarStore::new(Device::Cpu);
            let a = vs.root().var("a", &[3], nn::Init::Const(1.0));
            let b = vs.root().var("b", &[3], nn::Init::Const(1.0));
            let mut ddp = Ddp::new(&vs, comm, 4).unwrap();
            // The sync is told backward starts from `first`, which reaches only `a`; a second
            // backward in the same pass then adds to `b`, whose bucket left at the start.
            let first = a.sum(Kind::Float);
            let second = (&b * 2.0).sum(Kind::Float);
            let (_, synced) = ddp.sync_grads_during(comm, &first, || {
                first.backward();
                second.backward();
            });
            synced.unwrap_err().to_string()
        })
    });
    for err in results {
        assert!(err.contains("the gradient of b grew after its bucket was all-reduced"), "{err}");
    }
}

#[test]
fn ranks_that_built_different_models_all_stop_at_the_start_saying_so() {
    for (rank1_vars, what) in [(&["a", "b", "c"][..], "a variable more"), (&["a", "z"][..], "another name")] {
        let results = within(Duration::from_secs(60), move || {
            on_backend(BACKENDS[1], 2, TIMEOUT, move |rank, comm: &mut dyn Collective| {
                let vs = nn::VarStore::new(Device::Cpu);
                let names: &[&str] = if rank == 0 { &["a", "b"] } else { rank1_vars };
                for n in names {
                    let _ = vs.root().var(n, &[3], nn::Init::Const(1.0));
                }
                Ddp::new(&vs, comm, 4096).err().map(|e| e.to_string())
            })
        });
        for (rank, err) in results.iter().enumerate() {
            let err = err.as_deref().unwrap_or_else(|| panic!("{what}: rank {rank} went on"));
            assert!(err.contains("rank 1 built another model than rank 0"), "{what}: {err}");
        }
    }
}

#[test]
fn a_panic_in_backward_ends_the_pass_and_the_peer_gets_an_error_not_a_hang() {
    let results = within(Duration::from_secs(60), || {
        on_backend(BACKENDS[0], 2, TIMEOUT, |rank, comm: &mut dyn Collective| {
            tch::manual_seed(5);
            let vs = nn::VarStore::new(Device::Cpu);
            let model = TINY.init(&vs.root());
            let mut ddp = Ddp::new(&vs, comm, 4096).unwrap();
            let x = tokens(rank);
            let loss = model.loss(&x, &x);
            let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ddp.sync_grads_during(comm, &loss, || {
                    // Rank 0's code fails before backward: no bucket of it ever completes.
                    assert!(rank != 0, "rank 0's training code fails");
                    loss.backward();
                })
                .1
            }));
            match pass {
                Err(_) => "panicked".to_string(),
                Ok(synced) => synced.map_or_else(|e| e.to_string(), |()| "synced".to_string()),
            }
        })
    });
    assert_eq!(results[0], "panicked");
    // Rank 0's thread ends and its connections close: rank 1's all-reduce fails at once.
    assert_ne!(results[1], "synced", "rank 1 cannot have every bucket from a rank that stopped");
}
