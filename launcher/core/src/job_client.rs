//! A process's handle on its job, from Rust: find the other processes (the address book),
//! publish addresses of its own, report named metrics, send events to another role, and receive
//! the commands and events meant for it. Any process `rtrain launch` started can make one from
//! its environment; programs in other languages use the coordinator's HTTP/JSON endpoint
//! (`RTRAIN_HTTP`) for the same calls.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint as ChannelEndpoint};

use crate::contract::{EnvError, WorkerEnv, unix_now};
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{
    BroadcastRequest, Command, LookupRequest, MetricsReport, PublishRequest, TokenInterceptor, WorkerId,
};

pub type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// How long one call may take before it is reported as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JobClientError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("cannot start the control-plane runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("coordinator address `{addr}` is invalid: {reason}")]
    Address { addr: String, reason: String },
    #[error("the coordinator refused {call}: {message}")]
    Refused { call: &'static str, message: String },
    #[error("the coordinator did not answer {call} within {CALL_TIMEOUT:?}")]
    Timeout { call: &'static str },
}

/// The name the coordinator's certificate is issued to, whatever address it is reached at.
pub const TLS_SERVER_NAME: &str = "rtrain-coordinator";

/// The coordinator at `addr`, over TLS when `tls_ca` (the certificate of the job's CA, PEM) is
/// given: the coordinator of a job over several hosts proves itself with a certificate that CA
/// issued for [`TLS_SERVER_NAME`].
pub fn endpoint(addr: &str, tls_ca: Option<&str>) -> Result<ChannelEndpoint, JobClientError> {
    let bad_addr = |reason: String| JobClientError::Address { addr: addr.to_string(), reason };
    let scheme = if tls_ca.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| bad_addr(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(ca) = tls_ca {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(TLS_SERVER_NAME);
        endpoint = endpoint.tls_config(tls).map_err(|e| bad_addr(format!("TLS: {e}")))?;
    }
    Ok(endpoint)
}

/// A lazily connected client of the coordinator at `addr` (the first call connects, and a
/// dropped connection is re-established), on `runtime`; over TLS when `tls_ca` is given.
pub fn connect(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    token: &str,
    tls_ca: Option<&str>,
) -> Result<Client, JobClientError> {
    let bad_addr = |reason: String| JobClientError::Address { addr: addr.to_string(), reason };
    let endpoint = endpoint(addr, tls_ca)?;
    let interceptor = TokenInterceptor::new(token).map_err(|e| bad_addr(e.to_string()))?;
    let channel = {
        let _guard = runtime.enter();
        endpoint.connect_lazy()
    };
    Ok(CoordinatorClient::with_interceptor(channel, interceptor))
}

/// One process of the job, as the address book lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub role: String,
    pub rank: u32,
    /// The attempt (or incarnation) that published these addresses.
    pub attempt: u32,
    /// Named addresses: "collective" for runtime workers, and whatever the process published.
    pub addrs: std::collections::BTreeMap<String, String>,
}

/// The address book at one moment; `version` grows with every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressBook {
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
}

impl AddressBook {
    /// The address `name` of `role`'s rank `rank`, if it published one.
    pub fn addr(&self, role: &str, rank: u32, name: &str) -> Option<&str> {
        self.endpoints.iter().find(|e| e.role == role && e.rank == rank)?.addrs.get(name).map(String::as_str)
    }
}

/// A command or event for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCommand {
    pub seq: u64,
    pub kind: String,
    /// JSON text (may be empty).
    pub payload: String,
    /// The role that sent it; empty for the driver.
    pub from_role: String,
}

/// This process's handle on its job (blocking calls; they run on a small runtime of their own).
pub struct JobClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
    id: WorkerId,
}

impl JobClient {
    /// A client for the process `rtrain launch` started with this environment.
    pub fn from_env() -> Result<Self, JobClientError> {
        Self::new(&WorkerEnv::from_env()?)
    }

    pub fn new(env: &WorkerEnv) -> Result<Self, JobClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rtrain-job-client")
            .enable_all()
            .build()?;
        let client = connect(&runtime, &env.coordinator, &env.token, env.tls_ca.as_deref())?;
        let id = WorkerId { role: env.role.clone(), rank: env.rank as u32, attempt: env.attempt };
        Ok(Self { runtime, client, id })
    }

    /// Who this process is: role, rank and attempt.
    pub fn id(&self) -> &WorkerId {
        &self.id
    }

    fn call<T, F>(&self, call: &'static str, f: impl FnOnce(Client) -> F) -> Result<T, JobClientError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let future = f(self.client.clone());
        match self.runtime.block_on(async { tokio::time::timeout(CALL_TIMEOUT, future).await }) {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(JobClientError::Refused { call, message: status.message().to_string() }),
            Err(_) => Err(JobClientError::Timeout { call }),
        }
    }

    /// Publishes a named address of this process (e.g. "data" → "127.0.0.1:4242").
    pub fn publish(&self, name: &str, addr: &str) -> Result<(), JobClientError> {
        let req = PublishRequest { id: Some(self.id.clone()), name: name.into(), addr: addr.into() };
        self.call("publish", |mut c| async move { c.publish(req).await }).map(|_| ())
    }

    /// The live processes of `role` (every role for `""`) and what they published.
    pub fn lookup(&self, role: &str) -> Result<AddressBook, JobClientError> {
        let req = LookupRequest { role: role.into() };
        let reply = self.call("lookup", |mut c| async move { c.lookup(req).await })?;
        let endpoints = reply
            .endpoints
            .into_iter()
            .map(|e| Endpoint { role: e.role, rank: e.rank, attempt: e.attempt, addrs: e.addrs.into_iter().collect() })
            .collect();
        Ok(AddressBook { version: reply.version, endpoints })
    }

    /// Reports named metrics (written to metrics.jsonl with this process's role and rank).
    pub fn report_metrics(&self, step: u64, metrics: &[(&str, f64)]) -> Result<(), JobClientError> {
        let req = MetricsReport {
            id: Some(self.id.clone()),
            step,
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            time: unix_now(),
        };
        self.call("report_metrics", |mut c| async move { c.report_metrics(req).await }).map(|_| ())
    }

    /// Sends an event to every process of `to_role` (or one rank of it).
    pub fn broadcast(
        &self,
        to_role: &str,
        to_rank: Option<u32>,
        kind: &str,
        payload: &str,
    ) -> Result<(), JobClientError> {
        let req = BroadcastRequest {
            id: Some(self.id.clone()),
            to_role: to_role.into(),
            to_rank,
            kind: kind.into(),
            payload: payload.into(),
        };
        self.call("broadcast", |mut c| async move { c.broadcast(req).await }).map(|_| ())
    }

    /// The commands and events for this process from now on, as they arrive. The channel closes
    /// when the coordinator goes away.
    pub fn commands(&self) -> Result<std::sync::mpsc::Receiver<JobCommand>, JobClientError> {
        let id = self.id.clone();
        let mut stream = self.call("commands", |mut c| async move { c.commands(id).await })?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            while let Ok(Some(Command { seq, kind, payload, from_role })) = stream.message().await {
                if tx.send(JobCommand { seq, kind, payload, from_role }).is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
