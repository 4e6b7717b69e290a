//! `rtrain bench ...`: measurements printed beside their ceiling.

use std::process::ExitCode;

use clap::Subcommand;
use rtrain_trainer::collective::bench::{allreduce_bench, memcpy_bandwidth_gbps};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// All-reduce (sum, f32) bus bandwidth for 1–256 MiB, against the machine's memcpy bandwidth.
    Allreduce {
        /// Ranks, each a thread with its own communicator on loopback.
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Collective backend (tcp; nccl needs a GPU build and machine).
        #[arg(long, default_value = "tcp")]
        backend: String,
        /// Largest size in MiB (sizes go up by 4× from 1 MiB).
        #[arg(long, default_value_t = 256)]
        max_mib: usize,
        /// Timed iterations per size (after one warm-up).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// One JSON object per size instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: BenchCommand) -> ExitCode {
    match cmd {
        BenchCommand::Allreduce { ranks, backend, max_mib, iters, json } => {
            if backend != "tcp" {
                eprintln!("error: --backend {backend}: this benchmark runs the tcp backend; use --backend tcp");
                return ExitCode::from(2);
            }
            if ranks < 2 || iters == 0 {
                eprintln!("error: --ranks must be at least 2 and --iters at least 1");
                return ExitCode::from(2);
            }
            let mut sizes = Vec::new();
            let mut mib = 1;
            while mib <= max_mib.max(1) {
                sizes.push(mib << 20);
                mib *= 4;
            }
            let memcpy = memcpy_bandwidth_gbps(64 << 20);
            let results = match allreduce_bench(ranks, &sizes, iters) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: all-reduce benchmark failed: {e}");
                    return ExitCode::from(1);
                }
            };
            if json {
                for r in &results {
                    let mut v = serde_json::to_value(r).unwrap_or_default();
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("backend".into(), backend.clone().into());
                        obj.insert("ranks".into(), ranks.into());
                        obj.insert("memcpy_gbps".into(), memcpy.into());
                    }
                    println!("{v}");
                }
            } else {
                println!("all-reduce sum f32, backend {backend}, {ranks} ranks on loopback; memcpy ceiling {memcpy:.2} GB/s");
                println!("{:>10} {:>10} {:>10} {:>12} {:>12} {:>11}", "size", "algorithm", "time", "algbw GB/s", "busbw GB/s", "% memcpy");
                for r in &results {
                    println!(
                        "{:>7} MiB {:>10} {:>8.2}ms {:>12.2} {:>12.2} {:>10.1}%",
                        r.size_bytes >> 20,
                        r.algorithm,
                        r.time_s * 1e3,
                        r.algbw_gbps,
                        r.busbw_gbps,
                        100.0 * r.busbw_gbps / memcpy
                    );
                }
            }
            ExitCode::SUCCESS
        }
    }
}
