//! `rtrain ckpt list|inspect|verify RUN`: the checkpoints of a run, for users.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::checkpoint::{self, CHECKPOINTS_DIR, LATEST_FILE};
use clap::Subcommand;
use safetensors::SafeTensors;

#[derive(Subcommand, Debug)]
pub enum CkptCommand {
    /// Every checkpoint of a run: step, whether it verifies, size, loss.
    List {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
    },
    /// One checkpoint's manifest, trainer state and tensors (default: the newest valid one).
    Inspect {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
        /// The checkpoint's step.
        #[arg(long)]
        step: Option<u64>,
    },
    /// Checks every checkpoint against its manifest (sizes and SHA-256); exits 1 if any fails.
    Verify {
        /// The run directory (`<job.run_dir>/<job.name>`).
        run: PathBuf,
    },
}

pub fn run(cmd: CkptCommand) -> ExitCode {
    let result = match cmd {
        CkptCommand::List { run } => list(&run),
        CkptCommand::Inspect { run, step } => inspect(&run, step),
        CkptCommand::Verify { run } => verify(&run),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(crate::cli::EXIT_FAILED)
        }
    }
}

fn checkpoints(run: &Path) -> Result<Vec<checkpoint::Checkpoint>, String> {
    if !run.is_dir() {
        return Err(format!("{} is not a run directory", run.display()));
    }
    let all = checkpoint::list(run).map_err(|e| e.to_string())?;
    if all.is_empty() {
        return Err(format!(
            "{} has no checkpoints (looked in {}/)",
            run.display(),
            run.join(CHECKPOINTS_DIR).display()
        ));
    }
    Ok(all)
}

fn list(run: &Path) -> Result<ExitCode, String> {
    let latest = std::fs::read_to_string(run.join(CHECKPOINTS_DIR).join(LATEST_FILE)).unwrap_or_default();
    println!("{:>8}  {:<8}  {:>10}  {:>10}  {:>7}  path", "step", "status", "size", "loss", "workers");
    for c in checkpoints(run)? {
        let (status, size, state) = match checkpoint::verify(&c.path) {
            Ok(v) => ("ok", human_bytes(v.manifest.files.iter().map(|f| f.bytes).sum()), Some(v.state)),
            // A damaged checkpoint may still have a readable state to show.
            Err(_) => ("INVALID", "-".into(), checkpoint::read_state(&c.path).ok()),
        };
        let loss = state.as_ref().and_then(|s| s.metric).map_or_else(|| "-".into(), |l| format!("{l:.4}"));
        let workers = state.as_ref().map_or_else(|| "-".into(), |s| s.world_size.to_string());
        let mark = if latest.trim() == checkpoint::dir_name(c.step) { "  (latest)" } else { "" };
        println!("{:>8}  {status:<8}  {size:>10}  {loss:>10}  {workers:>7}  {}{mark}", c.step, c.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(run: &Path, step: Option<u64>) -> Result<ExitCode, String> {
    let all = checkpoints(run)?;
    let (chosen, checkpoint::Verified { manifest, state }) = match step {
        Some(s) => {
            let c = all
                .into_iter()
                .find(|c| c.step == s)
                .ok_or_else(|| format!("{} has no checkpoint of step {s}", run.display()))?;
            let verified =
                checkpoint::verify(&c.path).map_err(|e| format!("{}: does not verify: {e}", c.path.display()))?;
            (c, verified)
        }
        None => checkpoint::newest_valid(run)
            .map_err(|e| e.to_string())?
            .newest
            .ok_or_else(|| format!("{} has no valid checkpoint (see `rtrain ckpt verify`)", run.display()))?,
    };
    println!("checkpoint {} (verified)", chosen.path.display());
    println!(
        "  step {} | workers {} | global batch {} (micro {} × accum {}) | lr {:.3e} | loss {}",
        state.step,
        state.world_size,
        state.global_batch,
        state.micro_batch,
        state.grad_accum,
        state.lr,
        state.metric.map_or("-".into(), |l| format!("{l:.4}"))
    );
    println!("  config sha256 {}", state.config_digest);
    println!("  model: {}", serde_json::Value::Object(state.model.clone()));
    for f in &manifest.files {
        println!("  {:<24} {:>10}  sha256 {}", f.name, human_bytes(f.bytes), f.sha256);
    }
    for file in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
        let path = chosen.path.join(file);
        if !path.exists() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format!("{}: {e:?}", path.display()))?;
        let mut tensors: Vec<_> = header.tensors().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let numel: usize = tensors.iter().map(|(_, t)| t.shape.iter().product::<usize>()).sum();
        println!("  {file}: {} tensors, {numel} values", tensors.len());
        for (name, t) in tensors.iter().take(40) {
            println!("    {name:<48} {:?} {:?}", t.dtype, t.shape);
        }
        if tensors.len() > 40 {
            println!("    ... {} more", tensors.len() - 40);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(run: &Path) -> Result<ExitCode, String> {
    let mut bad = 0;
    for c in checkpoints(run)? {
        match checkpoint::verify(&c.path) {
            Ok(v) => println!("ok       {} ({} files)", c.path.display(), v.manifest.files.len()),
            Err(e) => {
                bad += 1;
                println!("INVALID  {}: {e}", c.path.display());
            }
        }
    }
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(crate::cli::EXIT_FAILED) })
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
