//! The worker process: reads its environment, joins the gang, runs a [`TrainLoop`] and reports
//! the outcome. A failure of any kind (error, libtorch exception, panic) is reported to the
//! coordinator as a structured error before the process exits non-zero.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::Device;

use crate::checkpoint::{self, TrainerState};
use crate::collective::{
    Collective, CollectiveError, HierarchicalCollective, NcclCollective, ReduceOp, ShmCollective, TcpCollective, shm,
};
use crate::config::{self, BackendKind, DeviceKind, MetricChoice};
use crate::proto::StepMetrics;
use crate::snapshot::Snapshot;
use crate::train_loop::{StepOutput, TrainContext, TrainError, TrainLoop};

use super::checkpoint_writer::CheckpointWriter;
use super::resume::resume;
use super::{ControlPlane, WorkerEnv, unix_now};

/// Exit code of a worker whose training loop failed.
pub const EXIT_TRAIN_FAILED: u8 = rtrain_core::exit::FAILED;
/// Exit code of a process started without a valid worker environment or config.
pub const EXIT_BAD_START: u8 = rtrain_core::exit::USAGE;

static PANIC_BACKTRACE: Mutex<Option<String>> = Mutex::new(None);

/// Set by SIGUSR1, the launch's request to stop: the gang saves a checkpoint at the end of the
/// current step, then exits. (SIGTERM keeps its default: the launch sends it to end a gang at
/// once, e.g. after a peer failed.)
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::Relaxed);
}

/// Exit code of a worker that stopped on request after saving its checkpoint (128 + SIGTERM, as
/// if a stop signal had ended it).
pub const EXIT_STOPPED: u8 = 128 + libc::SIGTERM as u8;

/// How [`train`] ended without an error.
enum Ended {
    /// Every step ran.
    Finished,
    /// Stopped on request at the end of this step, its checkpoint saved.
    Stopped(u64),
}

/// Runs this process as a worker of the gang: `build` makes the loop once the collective is up.
pub fn run_worker<L, F>(build: F) -> ExitCode
where
    L: TrainLoop,
    F: FnOnce(&mut TrainContext) -> Result<L, TrainError>,
{
    let env = match WorkerEnv::from_env() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("rtrain worker: {e}");
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    init_logging();
    // A file-size limit (RLIMIT_FSIZE) then fails a checkpoint write with an error, reported and
    // survived like a full disk, instead of killing the process.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGUSR1, request_stop as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    // Every log line of this process carries role:rank.
    let _span = tracing::info_span!("worker", id = %format!("{}:{}", env.role, env.rank)).entered();
    let mut control = match ControlPlane::connect(&env) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the coordinator");
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    std::panic::set_hook(Box::new(|info| {
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        if let Ok(mut slot) = PANIC_BACKTRACE.lock() {
            *slot = Some(trace);
        }
        tracing::error!(panic = %info, "worker panicked");
    }));
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| train(&env, &mut control, build)));
    let (message, backtrace, collective, deterministic) = match outcome {
        Ok(Ok(Ended::Finished)) => {
            control.finish();
            return ExitCode::SUCCESS;
        }
        Ok(Ok(Ended::Stopped(step))) => {
            tracing::info!(step, "stopped on request after saving a checkpoint");
            control.finish();
            return ExitCode::from(EXIT_STOPPED);
        }
        Ok(Err(e)) => (e.to_string(), String::new(), e.is_infrastructure(), e.is_deterministic()),
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic with a non-text payload".into());
            let trace = PANIC_BACKTRACE.lock().ok().and_then(|mut s| s.take()).unwrap_or_default();
            (format!("panic: {text}"), trace, false, false)
        }
    };
    tracing::error!(error = %message, "training failed");
    control.report_failure(&message, &backtrace, collective, deterministic);
    ExitCode::from(EXIT_TRAIN_FAILED)
}

fn train<L, F>(env: &WorkerEnv, control: &mut ControlPlane, build: F) -> Result<Ended, TrainError>
where
    L: TrainLoop,
    F: FnOnce(&mut TrainContext) -> Result<L, TrainError>,
{
    let loaded = config::load(&env.config, &[])?;
    let spec = loaded.spec;
    if !(spec.min_workers..=spec.workers).contains(&env.world_size) {
        return Err(TrainError::other(format!(
            "WORLD_SIZE {} is outside train.workers ({}..={}) in {}",
            env.world_size,
            spec.min_workers,
            spec.workers,
            env.config.display()
        )));
    }
    let global_batch = env.global_batch.unwrap_or(spec.global_batch);
    let spec = spec.with_world(env.world_size, global_batch);
    // libtorch resolves its CUDA backend once, on the first call that asks (manual_seed does): it
    // is loaded here, before any tch call. A failure is reported once the gang has agreed on it
    // (in NcclCollective::new), so that every rank fails with this rank's message.
    if spec.device == DeviceKind::Cuda
        && let Err(e) = crate::cuda::require_cuda(env.local_rank)
    {
        tracing::error!(error = %e, "CUDA is not available");
    }
    if spec.device == DeviceKind::Cuda {
        crate::precision::set_tf32(spec.tf32)?;
    }
    let threads = std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    tch::set_num_threads(threads);
    tch::manual_seed(spec.seed as i64);

    let host = env.bind_host.clone().unwrap_or_else(|| "127.0.0.1".into());
    let point =
        TcpCollective::bind(&host).map_err(|source| TrainError::CollectivePort { host: host.clone(), source })?;
    let peers = control.rendezvous(point.addr(), spec.rendezvous_timeout, spec.heartbeat_interval)?;
    // The ring's handshake proves the job token and covers the attempt.
    let mut bootstrap =
        point.with_session(env.attempt.into()).connect(env.rank, &peers, &env.token, spec.collective_timeout)?;
    let mut backend = spec.backend.name();
    let (device, collective): (Device, Box<dyn Collective>) = match (spec.device, spec.backend) {
        (DeviceKind::Cuda, BackendKind::Nccl) => {
            // LOCAL_RANK indexes the devices of CUDA_VISIBLE_DEVICES, which lists the gang's GPUs.
            let nccl =
                NcclCollective::new(env.rank, env.world_size, env.local_rank, &mut bootstrap, spec.collective_timeout)?;
            (Device::Cuda(env.local_rank), Box::new(nccl))
        }
        // Over several hosts: shared memory within each, one ring between them.
        (DeviceKind::Cpu, BackendKind::Shm { .. } | BackendKind::Tcp) if env.nodes > 1 => {
            backend = "hierarchical";
            let session = u64::from(env.attempt);
            let collective = HierarchicalCollective::new(
                bootstrap,
                env.node_rank as u64,
                &host,
                &env.token,
                session,
                spec.collective_timeout,
            )?;
            (Device::Cpu, Box::new(collective))
        }
        (DeviceKind::Cpu, BackendKind::Shm { or_tcp }) => {
            match ShmCollective::try_new(bootstrap, shm::DEFAULT_SLOT_BYTES) {
                Ok(shm) => (Device::Cpu, Box::new(shm)),
                Err((e @ CollectiveError::Unavailable { .. }, tcp)) if or_tcp => {
                    tracing::warn!(
                        reason = %e,
                        "shared memory is unavailable; using the tcp backend (train.backend = \"shm\" makes this an error)"
                    );
                    backend = "tcp";
                    (Device::Cpu, Box::new(tcp))
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        (DeviceKind::Cpu, BackendKind::Tcp) => (Device::Cpu, Box::new(bootstrap)),
        // The config's resolve() refuses these pairs; a worker given one by other means says so.
        (device @ DeviceKind::Cpu, backend @ BackendKind::Nccl)
        | (device @ DeviceKind::Cuda, backend @ (BackendKind::Tcp | BackendKind::Shm { .. })) => {
            return Err(TrainError::setting(
                "train.backend",
                format!(
                    "backend {} cannot reduce tensors on device {device:?}; use \"nccl\" with \"cuda\", or \"shm\"/\"tcp\" \
                     with \"cpu\"",
                    backend.name()
                ),
            ));
        }
    };
    tracing::info!(
        rank = env.rank,
        world_size = env.world_size,
        grad_accum = spec.grad_accum,
        attempt = env.attempt,
        backend,
        precision = %spec.precision,
        tf32 = spec.device == DeviceKind::Cuda && spec.tf32,
        "joined the gang"
    );

    let steps = spec.steps;
    let run_dir = env.run_dir.clone().unwrap_or_else(|| spec.run_path.clone());
    let mut ctx = TrainContext {
        rank: env.rank,
        local_rank: env.local_rank,
        world_size: env.world_size,
        attempt: env.attempt,
        device,
        spec,
        run_dir: run_dir.clone(),
        collective,
    };
    let mut train_loop = build(&mut ctx)?;
    let fingerprint = train_loop.fingerprint();
    let first = match &env.resume_from {
        Some(path) => resume(path, &mut train_loop)?,
        None => 0,
    };
    let config_text =
        std::fs::read_to_string(&env.config).map_err(|source| TrainError::Io { path: env.config.clone(), source })?;
    let config_digest = checkpoint::sha256_hex(config_text.as_bytes());
    let mut writer = (env.rank == 0).then(|| CheckpointWriter::new(&run_dir, config_text, ctx.spec.checkpoint));

    // The latest held-out loss, which checkpoints record when checkpoint.metric names it.
    let mut last_eval: Option<f64> = None;
    for step in first..steps {
        let started = Instant::now();
        let checked = control.check().map_err(|e| TrainError::other(e.to_string()));
        let out = match checked.and_then(|()| train_loop.step(&mut ctx, step)) {
            Ok(out) => out,
            Err(e) => {
                // A save still being written completes first: a peer's failure (the usual cause
                // of a failed step) should not also cost the newest checkpoint.
                if let Some(ck) = writer.as_mut() {
                    let _ = ck.finish();
                }
                return Err(e);
            }
        };
        let step_time = started.elapsed().as_secs_f64();
        let completed = step + 1;
        // Before any save: a diverged step must not become the checkpoint a restart resumes from.
        check_finite(completed, &out)?;
        last_eval = out.eval_loss.or(last_eval);
        // Every rank stops at the same step, once any has been asked to.
        let stopping = completed < steps && stop_agreed(&mut ctx)?;
        let mut stall = None;
        if let Some(ck) = writer.as_mut().filter(|_| stopping || ctx.spec.checkpoint.due(completed, steps)) {
            let saving = Instant::now();
            if let Some(state) = train_loop.state()? {
                let spec = &ctx.spec;
                let trainer_state = TrainerState {
                    step: completed,
                    world_size: ctx.world_size,
                    global_batch: spec.global_batch,
                    grad_accum: spec.grad_accum,
                    micro_batch: spec.micro_batch,
                    seed: spec.seed,
                    data_cursor: completed,
                    lr: out.lr,
                    metric: match spec.checkpoint.metric {
                        MetricChoice::Loss => Some(out.loss),
                        MetricChoice::EvalLoss => last_eval,
                    },
                    config_digest: config_digest.clone(),
                    model: fingerprint.clone(),
                    extra: state.extra,
                };
                ck.save(Snapshot { model: state.model, optimizer: state.optimizer, state: trainer_state })
                    .map_err(|source| TrainError::Checkpoint { context: "checkpoint", source })?;
                stall = Some(saving.elapsed().as_secs_f64());
            }
        }
        control.step_done(StepMetrics {
            id: None,
            step: completed,
            loss: out.loss,
            lr: out.lr,
            tokens_per_s: out.tokens as f64 / step_time.max(1e-9),
            time: unix_now(),
            grad_norm: out.grad_norm.unwrap_or(f64::NAN),
            step_time_s: step_time,
            attempt: env.attempt,
            checkpoint_stall_s: stall,
            extra: out.eval_loss.map(|v| ("eval_loss".to_string(), v)).into_iter().collect(),
            checkpoint_error: writer.as_mut().and_then(CheckpointWriter::take_failure),
        });
        if stopping {
            if let Some(ck) = writer.as_mut() {
                ck.finish().map_err(|source| TrainError::Checkpoint { context: "checkpoint on stop", source })?;
            }
            ctx.collective.barrier()?;
            return Ok(Ended::Stopped(completed));
        }
    }
    if let Some(ck) = writer.as_mut() {
        ck.finish().map_err(|source| TrainError::Checkpoint { context: "final checkpoint", source })?;
    }
    train_loop.finish(&mut ctx)?;
    // Every rank leaves together, so no peer sees a closed socket mid-collective.
    ctx.collective.barrier()?;
    Ok(Ended::Finished)
}

/// Whether any rank has been asked to stop: one small all-reduce per step, so that every rank
/// decides at the same step.
fn stop_agreed(ctx: &mut TrainContext) -> Result<bool, TrainError> {
    let asked = f32::from(u8::from(STOP_REQUESTED.load(Ordering::Relaxed)));
    let mut flag = tch::Tensor::from_slice(&[asked]).f_to_device(ctx.device)?;
    ctx.collective.all_reduce(&mut flag, ReduceOp::Sum)?;
    Ok(flag.f_double_value(&[0])? > 0.0)
}

/// A non-finite loss, gradient norm or learning rate ends the run: the weights are already
/// poisoned, and replaying the same steps from the last checkpoint gives the same numbers.
fn check_finite(step: u64, out: &StepOutput) -> Result<(), TrainError> {
    let values = [
        ("loss", Some(out.loss)),
        ("gradient norm", out.grad_norm),
        ("learning rate", Some(out.lr)),
        ("held-out loss", out.eval_loss),
    ];
    match values.into_iter().find_map(|(what, v)| v.filter(|v| !v.is_finite()).map(|v| (what, v))) {
        Some((what, value)) => Err(TrainError::NonFinite { step, what, value }),
        None => Ok(()),
    }
}

/// Logging of a process the launcher started: `RTRAIN_LOG` filters (default `info`), plain text
/// on stderr, which the launcher writes to the process's log file.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RTRAIN_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
