//! `rtrain bench ...`: measurements printed beside their ceiling. The tensor benchmarks need
//! libtorch and run in `rtrain-worker`; the ones here run in `rtrain` itself.

use std::path::PathBuf;

use clap::Subcommand;

mod control_plane;
mod peer_digest;
mod recovery;
mod thread_cpu;

pub use control_plane::{ControlPlaneOptions, ControlPlaneReport, control_plane, control_plane_command};
pub use recovery::recovery_command;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// All-reduce (sum, f32) bus bandwidth for 1–256 MiB, against the machine's memcpy bandwidth.
    Allreduce {
        /// Ranks, each a thread with its own communicator on loopback.
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Simulated hosts the ranks are split over (contiguously): with more than one, the flat
        /// TCP ring over every rank and the hierarchical all-reduce (shared memory inside a host, a
        /// ring between hosts) are timed side by side.
        #[arg(long, default_value_t = 1)]
        hosts: usize,
        /// Give each simulated host a network of its own: NAME=ADDRESS per host, an `ip netns`
        /// namespace and the host's address in it (bench/multi_host_allreduce.sh makes them,
        /// joined by a rate-limited link). Needs root.
        #[arg(long, value_delimiter = ',', value_name = "NAME=ADDRESS")]
        netns: Vec<String>,
        /// Collective backend: shm (times a plain buffer, staged through shared memory, and a
        /// shared buffer reduced in place, as DDP's gradients are) or tcp.
        #[arg(long, default_value = "shm")]
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
    /// Greedy generation tokens/s on a Hugging Face model folder for batches of random prompts,
    /// every sequence run to its full length (compare with bench/hf_generate.py).
    Generate {
        /// A Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// Batch sizes, comma-separated.
        #[arg(long, default_value = "1,32", value_delimiter = ',')]
        batch: Vec<usize>,
        /// Tokens per prompt.
        #[arg(long, default_value_t = 16)]
        prompt_len: usize,
        /// Tokens generated per sequence.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Timed runs per batch size (after one warm-up); the best is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Above 1: each batch is batch / group_size prompts sampled group_size times, timed both
        /// as repeated prompts (`generate`) and as groups sharing one prefill (`generate_groups`).
        #[arg(long, default_value_t = 1)]
        group_size: usize,
        /// One JSON object per figure instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Kill a worker of a running job (kill -9) several times; report kill → training running
    /// again (first optimizer step done by the new attempt), against the 2 s target, and the
    /// async checkpoint stall against one step's time (target 5%).
    Recovery {
        /// Job to run; default: the GPT benchmark spec (configs/bench/ddp_gpt.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Kills, one per attempt.
        #[arg(long, default_value_t = 3)]
        kills: u64,
        /// Steps each attempt trains before its kill.
        #[arg(long, default_value_t = 4)]
        steps_between: u64,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// N simulated ranks register, rendezvous and heartbeat at 1 Hz against one coordinator;
    /// reports the rendezvous time (target: 4096 ranks in < 2 s) and the coordinator's CPU while
    /// heartbeating (target: < 5% of one core).
    ControlPlane {
        /// Gang sizes, comma-separated; one coordinator each.
        #[arg(long, default_value = "256,1024,4096", value_delimiter = ',')]
        ranks: Vec<usize>,
        /// Seconds of heartbeats measured per gang size.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// HTTP/2 connections the simulated ranks share (real workers open one each).
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// One JSON object per gang size instead of a table.
        #[arg(long)]
        json: bool,
    },
}
