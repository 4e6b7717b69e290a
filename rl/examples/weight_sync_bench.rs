//! Weight sync bandwidth against memcpy, for the weight-sync target of docs/DESIGN.md §11.11.
//!
//! Run with: `cargo run --release -p rtrain-rl --example weight_sync_bench -- [--mb 100,500] [--rounds 5] [--json]`

use rtrain_rl::weight_sync::bench::{WeightSyncBench, weight_sync_bench};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut sizes_mb, mut rounds, mut json) = (vec![100u64, 500], 5usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mb" => {
                let list = args.next().ok_or("--mb needs a list, e.g. 100,500")?;
                sizes_mb = list.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
            }
            "--rounds" => rounds = args.next().ok_or("--rounds needs a number")?.parse()?,
            "--json" => json = true,
            other => return Err(format!("unknown argument {other:?} (--mb LIST, --rounds N, --json)").into()),
        }
    }
    if !json {
        println!("weight sync on one host, {rounds} versions per row (medians); memcpy: one thread, same rounds");
        println!(
            "{:>8} {:>9} {:>8} {:>13} {:>10} {:>10} {:>13} {:>12} {:>13}",
            "size",
            "transport",
            "tensors",
            "publish GB/s",
            "sync ms",
            "sync GB/s",
            "first sync ms",
            "memcpy GB/s",
            "sync/memcpy"
        );
    }
    for mb in sizes_mb {
        for row in weight_sync_bench(mb * 1_000_000, rounds)? {
            if json {
                print_json(&row);
            } else {
                print_row(&row);
            }
        }
    }
    if !json {
        println!("target (DESIGN.md section 11): shm sync >= 50% of memcpy");
    }
    Ok(())
}

fn print_row(r: &WeightSyncBench) {
    let verdict = match r.transport {
        "shm" if r.sync_vs_memcpy() >= 0.5 => " (met)",
        "shm" => " (MISSED)",
        _ => "",
    };
    println!(
        "{:>5} MB {:>9} {:>8} {:>13.2} {:>10.1} {:>10.2} {:>13.1} {:>12.2} {:>12.0}%{verdict}",
        r.bytes / 1_000_000,
        r.transport,
        r.tensors,
        r.publish_gbps(),
        r.sync_s * 1e3,
        r.sync_gbps(),
        r.first_sync_s * 1e3,
        r.memcpy_gbps(),
        r.sync_vs_memcpy() * 100.0
    );
}

fn print_json(r: &WeightSyncBench) {
    println!(
        "{{\"transport\": \"{}\", \"bytes\": {}, \"tensors\": {}, \"publish_s\": {:.6}, \"sync_s\": {:.6}, \
         \"first_sync_s\": {:.6}, \"memcpy_s\": {:.6}, \"sync_vs_memcpy\": {:.4}}}",
        r.transport,
        r.bytes,
        r.tensors,
        r.publish_s,
        r.sync_s,
        r.first_sync_s,
        r.memcpy_s,
        r.sync_vs_memcpy()
    );
}
