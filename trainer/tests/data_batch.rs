//! The batch plan: any split of a step's global sample range rebuilds the same global batch, and
//! targets are the inputs shifted by one byte.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Instant;

use rtrain_trainer::data::{BatchPlan, ByteCorpus};
use tch::{Kind, Tensor};

fn plan() -> BatchPlan {
    BatchPlan { seed: 42, seq_len: 32, global_batch: 12 }
}

#[test]
fn any_split_rebuilds_the_global_batch() {
    let corpus = ByteCorpus::synthetic(1, 100_000);
    let plan = plan();
    for step in [0u64, 1, 17, 1_000_000] {
        let (x, y) = plan.micro_batch(&corpus, step, 0..12);
        // world size x accumulation: 1x1, 2x1, 2x2, 3x2, 4x3, 12x1 and an uneven split.
        let splits: [&[usize]; 7] =
            [&[12], &[6, 6], &[3, 3, 3, 3], &[2, 2, 2, 2, 2, 2], &[1; 12], &[4, 4, 4], &[5, 1, 6]];
        for split in splits {
            let mut start = 0;
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            for &n in split {
                let (xi, yi) = plan.micro_batch(&corpus, step, start..start + n);
                xs.push(xi);
                ys.push(yi);
                start += n;
            }
            assert!(Tensor::cat(&xs, 0).equal(&x), "inputs differ for split {split:?}");
            assert!(Tensor::cat(&ys, 0).equal(&y), "targets differ for split {split:?}");
        }
    }
}

#[test]
fn batches_are_shifted_windows_of_the_corpus() {
    let corpus = ByteCorpus::synthetic(2, 50_000);
    let plan = plan();
    let (x, y) = plan.micro_batch(&corpus, 5, 3..7);
    assert_eq!(x.size(), [4, 32]);
    assert_eq!(x.kind(), Kind::Int64);
    assert_eq!(y.kind(), Kind::Int64);
    assert_eq!(x.device(), tch::Device::Cpu);
    assert!(x.narrow(1, 1, 31).equal(&y.narrow(1, 0, 31)));
    for (row, sample) in (3..7).enumerate() {
        let off = plan.sample_offset(5, sample, corpus.len());
        let want: Vec<i64> = corpus.bytes()[off..off + 33].iter().map(|&b| i64::from(b)).collect();
        let got = Vec::<i64>::try_from(x.get(row as i64)).unwrap();
        assert_eq!(got, want[..32]);
        let got = Vec::<i64>::try_from(y.get(row as i64)).unwrap();
        assert_eq!(got, want[1..]);
    }
}

#[test]
fn steps_draw_different_batches() {
    let corpus = ByteCorpus::synthetic(3, 100_000);
    let plan = plan();
    let (a, _) = plan.micro_batch(&corpus, 0, 0..12);
    let (b, _) = plan.micro_batch(&corpus, 1, 0..12);
    let (c, _) = BatchPlan { seed: 43, ..plan }.micro_batch(&corpus, 0, 0..12);
    assert!(!a.equal(&b));
    assert!(!a.equal(&c));
}

#[test]
fn synthetic_corpus_is_fast() {
    let start = Instant::now();
    let corpus = ByteCorpus::synthetic(7, 4 << 20);
    let elapsed = start.elapsed();
    assert_eq!(corpus.len(), 4 << 20);
    // Generous bound for an unoptimised CI build; typically a few tens of milliseconds.
    assert!(elapsed.as_secs_f64() < 2.0, "4 MiB took {elapsed:?}");
}

#[test]
#[should_panic(expected = "outside the global batch")]
fn samples_past_the_global_batch_panic() {
    let corpus = ByteCorpus::synthetic(1, 1000);
    let _ = plan().micro_batch(&corpus, 0, 10..13);
}
