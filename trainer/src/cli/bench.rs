//! The benchmarks that need libtorch: `rtrain bench allreduce` and `rtrain bench generate`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use rtrain_launcher::cli::{EXIT_CONFIG, EXIT_FAILED};

use crate::collective::NcclCollective;
use crate::collective::bench::{BenchBackend, HostNetns, allreduce_bench_on_hosts, memcpy_bandwidth_gbps};
use crate::hf::{Generation, HfError, HfModel, SamplingParams, Tokenizer, generate, generate_groups};

/// `rtrain bench generate`.
pub fn generate_command(
    model: &Path,
    batch: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    repeats: usize,
    group_size: usize,
    json: bool,
) -> ExitCode {
    match generate_bench(model, batch, prompt_len, new_tokens, repeats.max(1), group_size, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: generation benchmark: {e}");
            ExitCode::from(1)
        }
    }
}

/// `rtrain bench allreduce`.
pub fn allreduce_command(
    ranks: usize,
    hosts: usize,
    netns: &[String],
    backend: &str,
    max_mib: usize,
    iters: usize,
    json: bool,
) -> ExitCode {
    let Some(which) = BenchBackend::parse(backend) else {
        eprintln!("error: --backend {backend}: not a backend of this benchmark; use shm, tcp or nccl");
        return ExitCode::from(EXIT_CONFIG);
    };
    if ranks < 2 || iters == 0 {
        eprintln!("error: --ranks must be at least 2 and --iters at least 1");
        return ExitCode::from(EXIT_CONFIG);
    }
    if hosts == 0 || hosts > ranks || (hosts > 1 && which == BenchBackend::Nccl) {
        eprintln!("error: --hosts must be from 1 to --ranks ({ranks}), and 1 with --backend nccl");
        return ExitCode::from(EXIT_CONFIG);
    }
    let spaces: Option<Vec<HostNetns>> = netns
        .iter()
        .map(|s| {
            let (name, addr) = s.split_once('=')?;
            addr.parse::<std::net::IpAddr>().ok()?;
            Some(HostNetns { name: name.to_string(), addr: addr.to_string() })
        })
        .collect();
    let Some(spaces) = spaces else {
        eprintln!("error: --netns takes NAME=ADDRESS per host (an ip netns namespace and an IP address in it)");
        return ExitCode::from(EXIT_CONFIG);
    };
    if !spaces.is_empty() && spaces.len() != hosts {
        eprintln!("error: --netns names {} namespaces for --hosts {hosts}: give one per host", spaces.len());
        return ExitCode::from(EXIT_CONFIG);
    }
    if which == BenchBackend::Nccl {
        // Before any other tch call: libtorch's CUDA backend is loaded here (see crate::cuda).
        let ready = (0..ranks).try_for_each(crate::cuda::require_cuda).map_err(|e| e.to_string());
        if let Err(e) = ready.and_then(|()| NcclCollective::probe().map_err(|e| e.to_string())) {
            eprintln!(
                "error: --backend nccl runs one rank per GPU ({ranks} ranks): {e}; use --backend shm or tcp on CPU"
            );
            return ExitCode::from(EXIT_FAILED);
        }
    }
    let mut sizes = Vec::new();
    let mut mib = 1;
    while mib <= max_mib.max(1) {
        sizes.push(mib << 20);
        mib *= 4;
    }
    let memcpy = memcpy_bandwidth_gbps(64 << 20);
    let results = match allreduce_bench_on_hosts(which, ranks, hosts, &spaces, &sizes, iters) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: all-reduce benchmark failed: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if json {
        for r in &results {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("ranks".into(), ranks.into());
                obj.insert("memcpy_gbps".into(), memcpy.into());
            }
            println!("{v}");
        }
    } else {
        if hosts > 1 {
            let network = match spaces.is_empty() {
                true => "sharing loopback".to_string(),
                false => format!(
                    "each in its own network namespace ({})",
                    spaces.iter().map(|s| format!("{} {}", s.name, s.addr)).collect::<Vec<_>>().join(", ")
                ),
            };
            println!(
                "all-reduce sum f32, {ranks} ranks on {hosts} simulated hosts {network}: flat tcp ring over every rank \
                 beside the hierarchical all-reduce (shared memory in a host, a ring between hosts); memcpy ceiling \
                 {memcpy:.2} GB/s"
            );
        } else if which == BenchBackend::Nccl {
            println!(
                "all-reduce sum f32, backend nccl, {ranks} ranks on CUDA devices 0..{ranks}; host memcpy {memcpy:.2} GB/s"
            );
        } else {
            println!(
                "all-reduce sum f32, backend {backend}, {ranks} ranks on loopback; memcpy ceiling {memcpy:.2} GB/s"
            );
        }
        println!(
            "{:>10} {:>12} {:>10} {:>12} {:>12} {:>11}",
            "size", "algorithm", "time", "algbw GB/s", "busbw GB/s", "% memcpy"
        );
        for r in &results {
            println!(
                "{:>7} MiB {:>12} {:>8.2}ms {:>12.2} {:>12.2} {:>10.1}%",
                r.size_bytes >> 20,
                r.algorithm,
                r.time_s * 1e3,
                r.algbw_gbps,
                r.busbw_gbps,
                100.0 * r.busbw_gbps / memcpy
            );
        }
        if hosts > 1 {
            for size in &sizes {
                let time = |algorithm: &str| {
                    results.iter().find(|r| r.size_bytes == *size && r.algorithm == algorithm).map(|r| r.time_s)
                };
                if let (Some(flat), Some(hier)) = (time("flat-ring"), time("hierarchical")) {
                    println!(
                        "{:>7} MiB: hierarchical {:.2}x the flat ring (target >= 1.5x where hosts are joined by a link \
                         slower than memory; docs/DESIGN.md 11.2)",
                        size >> 20,
                        flat / hier
                    );
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// Greedy tokens/s per batch size. With `group_size` > 1 a batch is `batch / group_size`
/// prompts, each sampled `group_size` times, timed as repeated prompts and as shared-prefill
/// groups.
fn generate_bench(
    model_dir: &Path,
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    repeats: usize,
    group_size: usize,
    json: bool,
) -> Result<(), String> {
    let model = HfModel::load(model_dir, tch::Device::Cpu).map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::from_dir(model_dir).map_err(|e| e.to_string())?;
    // Every sequence runs to its full length, as the transformers side forces with min_new_tokens.
    tokenizer.stop_ids.clear();
    let params = SamplingParams { max_new_tokens: new_tokens, temperature: 0.0, ..SamplingParams::default() };
    let g = group_size.max(1);
    // Prompt ids are drawn below the model's vocabulary (and the usual 256 byte-level ids).
    let vocab = u64::try_from(model.config.vocab_size()).unwrap_or(1).clamp(1, 256);
    let mut state = 0x5eed_u64;
    for &batch in batches {
        if batch % g != 0 {
            return Err(format!("--batch {batch} is not a multiple of --group-size {g}"));
        }
        let prompts: Vec<Vec<u32>> = (0..batch / g)
            .map(|_| {
                (0..prompt_len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((state >> 33) % vocab) as u32
                    })
                    .collect()
            })
            .collect();
        let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect();
        let methods: &[&str] = if g > 1 { &["generate", "generate_groups"] } else { &["generate"] };
        for &method in methods {
            let run = || -> Result<Vec<Generation>, HfError> {
                if method == "generate" {
                    generate(&model, &tokenizer, &repeated, &params)
                } else {
                    Ok(generate_groups(&model, &tokenizer, &prompts, g, &params)?.into_iter().flatten().collect())
                }
            };
            run().map_err(|e| e.to_string())?; // warm-up
            let mut best = f64::INFINITY;
            for _ in 0..repeats {
                let t0 = Instant::now();
                let out = run().map_err(|e| e.to_string())?;
                best = best.min(t0.elapsed().as_secs_f64());
                if out.len() != batch || out.iter().any(|g| g.token_ids.len() != new_tokens) {
                    return Err("a sequence ended early".into());
                }
            }
            let tokens_per_s = (batch * new_tokens) as f64 / best;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "framework": "rtrain", "method": method, "batch": batch, "group_size": g, "prompt_len": prompt_len, "new_tokens": new_tokens, "time_s": best, "tokens_per_s": tokens_per_s, "threads": tch::get_num_threads() })
                );
            } else {
                let label = if g > 1 { format!(" {method:<15} (groups of {g})") } else { String::new() };
                println!(
                    "batch {batch:>3}{label}: {tokens_per_s:>9.1} generated tokens/s ({new_tokens} new tokens in {best:.3} s)"
                );
            }
        }
    }
    Ok(())
}
