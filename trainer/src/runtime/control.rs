//! The worker's side of the control plane: rendezvous, heartbeats, step metrics and failure
//! reports. RPCs run on a small background runtime so the training thread never waits on them,
//! except for rendezvous, which is a synchronisation point by nature.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtrain_core::heartbeat::beats;
use rtrain_core::job_client::{Client, JobClientError, connect};
use tokio::sync::mpsc;

use crate::proto::{FailureReport, RegisterRequest, StepMetrics, WorkerId};

use super::WorkerEnv;

/// How long a worker keeps going without reaching its coordinator before it exits: the
/// launcher is gone and nobody would collect its results.
const COORDINATOR_LOST_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot start the control-plane runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error(transparent)]
    Connect(#[from] JobClientError),
    #[error("rendezvous refused: {0}")]
    Refused(String),
    /// The coordinator retired this attempt, or has been unreachable for too long.
    #[error("{0}")]
    Lost(String),
}

/// Connection to the job's coordinator, owned by the worker's main thread.
pub struct ControlPlane {
    runtime: tokio::runtime::Runtime,
    client: Client,
    id: WorkerId,
    step: Arc<AtomicU64>,
    metrics: Option<mpsc::UnboundedSender<StepMetrics>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    /// Set by the heartbeat task when this worker should stop: the step loop checks it, so the
    /// worker still finishes a checkpoint in flight and reports the failure.
    lost: Arc<Mutex<Option<String>>>,
}

impl ControlPlane {
    pub fn connect(env: &WorkerEnv) -> Result<Self, ControlError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rtrain-control")
            .enable_all()
            .build()?;
        let client = connect(&runtime, &env.coordinator, &env.token, env.tls_ca.as_deref())?;
        let id = WorkerId { role: env.role.clone(), rank: env.rank as u32, attempt: env.attempt };
        Ok(Self {
            runtime,
            client,
            id,
            step: Arc::new(AtomicU64::new(0)),
            metrics: None,
            metrics_task: None,
            lost: Arc::new(Mutex::new(None)),
        })
    }

    /// Registers this rank's collective address; returns every rank's address once the whole
    /// gang has registered (sync point).
    pub fn rendezvous(
        &mut self,
        collective_addr: &str,
        timeout: Duration,
        heartbeat_every: Duration,
    ) -> Result<Vec<String>, ControlError> {
        let request = RegisterRequest { id: Some(self.id.clone()), collective_addr: collective_addr.to_string() };
        let mut client = self.client.clone();
        let reply = self.runtime.block_on(async move {
            let deadline = Instant::now() + timeout;
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let attempt = tokio::time::timeout(remaining, client.register(request.clone())).await;
                let Ok(result) = attempt else {
                    return Err(ControlError::Refused(format!("the gang did not complete within {timeout:?}")));
                };
                match result {
                    Ok(reply) => return Ok(reply.into_inner()),
                    // The coordinator is up before workers start, but tolerate a slow accept.
                    Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(status) => return Err(ControlError::Refused(status.message().to_string())),
                }
            }
        })?;
        self.start_background(heartbeat_every);
        Ok(reply.peers)
    }

    fn start_background(&mut self, heartbeat_every: Duration) {
        let (tx, mut rx) = mpsc::unbounded_channel::<StepMetrics>();
        self.metrics = Some(tx);
        let mut client = self.client.clone();
        self.metrics_task = Some(self.runtime.spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Err(status) = client.report_step(m).await {
                    tracing::warn!(error = %status.message(), "step metrics not delivered");
                }
            }
        }));
        let (mut client, id, step) = (self.client.clone(), self.id.clone(), self.step.clone());
        let lost = self.lost.clone();
        self.runtime.spawn(async move {
            // When the transport last took a beat: it only does over a live connection.
            let last_ok = Arc::new(Mutex::new(Instant::now()));
            loop {
                // One long-lived stream; it ends only with an error, and is reopened after one.
                let (step, sent) = (step.clone(), last_ok.clone());
                let beats = beats(id.clone(), heartbeat_every, move || {
                    *sent.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    step.load(Ordering::Relaxed)
                });
                let status = match client.heartbeats(beats).await {
                    Ok(_) => tonic::Status::unavailable("the coordinator ended the heartbeat stream"),
                    Err(status) => status,
                };
                let silent = last_ok.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                let why = match status.code() {
                    tonic::Code::FailedPrecondition => {
                        format!("the coordinator retired this attempt: {}", status.message())
                    }
                    _ if silent > COORDINATOR_LOST_AFTER => {
                        format!(
                            "the coordinator has been unreachable for {COORDINATOR_LOST_AFTER:?}: {}",
                            status.message()
                        )
                    }
                    _ => {
                        tokio::time::sleep(heartbeat_every).await;
                        continue;
                    }
                };
                tracing::error!(reason = %why, "stopping after the current step");
                *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                return;
            }
        });
    }

    /// Why this worker must stop, once the heartbeat found it retired or the coordinator gone.
    pub fn check(&self) -> Result<(), ControlError> {
        match self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(why) => Err(ControlError::Lost(why.clone())),
            None => Ok(()),
        }
    }

    /// Records progress for heartbeats and, on rank 0, sends the step's metrics (non-blocking).
    pub fn step_done(&self, metrics: StepMetrics) {
        self.step.store(metrics.step, Ordering::Relaxed);
        if let (0, Some(tx)) = (self.id.rank, &self.metrics) {
            let _ = tx.send(StepMetrics { id: Some(self.id.clone()), ..metrics });
        }
    }

    /// Sends a structured error to the coordinator; best effort, bounded in time.
    pub fn report_failure(&self, message: &str, backtrace: &str, collective: bool, deterministic: bool) {
        let report = FailureReport {
            id: Some(self.id.clone()),
            message: message.into(),
            backtrace: backtrace.into(),
            collective,
            deterministic,
        };
        let mut client = self.client.clone();
        let _ = self
            .runtime
            .block_on(async move { tokio::time::timeout(Duration::from_secs(2), client.report_failure(report)).await });
    }

    /// Delivers the metrics still queued (bounded in time), then stops the background tasks.
    pub fn finish(mut self) {
        self.metrics = None;
        if let Some(task) = self.metrics_task.take() {
            let _ = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
        }
        self.runtime.shutdown_timeout(Duration::from_millis(100));
    }
}
