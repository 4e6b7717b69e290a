//! The worker process: reads its environment, joins the gang, runs a [`TrainLoop`] and reports
//! the outcome. A failure of any kind (error, libtorch exception, panic) is reported to the
//! coordinator as a structured error before the process exits non-zero.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tch::Device;

use crate::collective::{Collective, NcclCollective, TcpCollective};
use crate::config::{self, BackendKind, DeviceKind};
use crate::proto::StepMetrics;
use crate::train_loop::{TrainContext, TrainError, TrainLoop};

use super::{ControlPlane, WorkerEnv};

/// Exit code of a worker whose training loop failed.
pub const EXIT_TRAIN_FAILED: u8 = 1;
/// Exit code of a process started without a valid worker environment or config.
pub const EXIT_BAD_START: u8 = 2;

static PANIC_BACKTRACE: Mutex<Option<String>> = Mutex::new(None);

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
    let (message, backtrace) = match outcome {
        Ok(Ok(())) => {
            control.finish();
            return ExitCode::SUCCESS;
        }
        Ok(Err(e)) => (e.to_string(), String::new()),
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic with a non-text payload".into());
            let trace = PANIC_BACKTRACE.lock().ok().and_then(|mut s| s.take()).unwrap_or_default();
            (format!("panic: {text}"), trace)
        }
    };
    tracing::error!(error = %message, "training failed");
    control.report_failure(&message, &backtrace);
    ExitCode::from(EXIT_TRAIN_FAILED)
}

fn train<L, F>(env: &WorkerEnv, control: &mut ControlPlane, build: F) -> Result<(), TrainError>
where
    L: TrainLoop,
    F: FnOnce(&mut TrainContext) -> Result<L, TrainError>,
{
    let loaded = config::load(&env.config, &[]).map_err(|e| TrainError::other(e.to_string()))?;
    let spec = loaded.spec;
    if env.world_size != spec.workers {
        return Err(TrainError::other(format!(
            "WORLD_SIZE {} differs from train.workers {} in {}",
            env.world_size,
            spec.workers,
            env.config.display()
        )));
    }
    let threads = std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    tch::set_num_threads(threads);
    tch::manual_seed(spec.seed as i64);

    let host = std::env::var("RTRAIN_BIND_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let point = TcpCollective::bind(&host).map_err(|e| TrainError::other(format!("cannot open a collective port on {host}: {e}")))?;
    let peers = control
        .rendezvous(point.addr(), spec.rendezvous_timeout, spec.heartbeat_interval)
        .map_err(|e| TrainError::other(e.to_string()))?;
    let mut bootstrap = point.connect(env.rank, &peers, spec.collective_timeout)?;
    let (device, collective): (Device, Box<dyn Collective>) = match (spec.device, spec.backend) {
        (DeviceKind::Cuda, BackendKind::Nccl) => {
            let nccl = NcclCollective::new(env.rank, env.world_size, env.local_rank, &mut bootstrap)?;
            (Device::Cuda(env.local_rank), Box::new(nccl))
        }
        _ => (Device::Cpu, Box::new(bootstrap)),
    };
    tracing::info!(rank = env.rank, world_size = env.world_size, attempt = env.attempt, backend = spec.backend.name(), "joined the gang");

    let steps = spec.steps;
    let mut ctx = TrainContext {
        rank: env.rank,
        local_rank: env.local_rank,
        world_size: env.world_size,
        attempt: env.attempt,
        device,
        spec,
        collective,
    };
    let mut train_loop = build(&mut ctx)?;
    for step in 0..steps {
        let started = Instant::now();
        let out = train_loop.step(&mut ctx, step)?;
        let step_time = started.elapsed().as_secs_f64();
        control.step_done(StepMetrics {
            id: None,
            step: step + 1,
            loss: out.loss,
            lr: out.lr,
            tokens_per_s: out.tokens as f64 / step_time.max(1e-9),
            time: unix_now(),
            grad_norm: out.grad_norm.unwrap_or(f64::NAN),
            step_time_s: step_time,
        });
    }
    // Every rank leaves together, so no peer sees a closed socket mid-collective.
    ctx.collective.barrier()?;
    Ok(())
}

/// Seconds since the Unix epoch, as a float.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RTRAIN_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
