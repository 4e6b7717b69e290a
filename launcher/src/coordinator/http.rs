//! The coordinator's HTTP/JSON endpoint: the address book, named metrics, broadcasts and the
//! command stream for processes written in any language (a Python script needs only its standard
//! library). Every request carries the job token, as `x-rtrain-token: TOKEN` or
//! `Authorization: Bearer TOKEN`; the caller names itself with the `role`, `rank` and `attempt`
//! its environment gives it (`RTRAIN_ROLE`, `ROLE_RANK`, `RTRAIN_ATTEMPT`).
//!
//! | request | body or query | answer |
//! | --- | --- | --- |
//! | `GET /v1/addresses?role=R` | role optional | `{"version", "endpoints": [{"role", "rank", "attempt", "addrs": {name: addr}}]}` |
//! | `POST /v1/publish` | `{"role", "rank", "attempt", "name", "addr"}` | `{}` |
//! | `POST /v1/heartbeat` | `{"role", "rank", "attempt", "step"}` | `{}`; a process that sends them and then falls silent past `fault.heartbeat_timeout_s` is hung, killed and restarted |
//! | `POST /v1/metrics` | `{"role", "rank", "attempt", "step", "metrics": {name: number}}` | `{}` |
//! | `POST /v1/step` | `{"role", "rank", "attempt", "step", "loss", "lr"?, "tokens"?, "step_time_s"?, "grad_norm"?, "metrics"?: {name: number}}` | `{}`; rank 0 of the training role only: an optimizer step of a training script of its own, which moves the progress bar and goes to metrics.jsonl and summary.json as the built-in trainers' steps do (steps must increase within an attempt); it counts as a heartbeat too |
//! | `POST /v1/broadcast` | `{"role", "rank", "attempt", "to_role", "to_rank"?, "kind", "payload"?}` | `{}` |
//! | `GET /v1/commands?role=R&rank=K&attempt=A` | | one JSON object per line, as they come: `{"seq", "kind", "payload", "from_role"}` |

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::service::Shared;
use crate::contract::unix_now;
use crate::proto::{BroadcastRequest, MetricsReport, PublishRequest, StepMetrics, TOKEN_HEADER, WorkerId};

/// The largest request body: metrics and steps are a few hundred bytes.
const MAX_BODY_BYTES: usize = 1 << 20;

pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = axum::Router::new()
        .route("/v1/addresses", get(addresses))
        .route("/v1/publish", post(publish))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/metrics", post(metrics))
        .route("/v1/step", post(step))
        .route("/v1/broadcast", post(broadcast))
        .route("/v1/commands", get(commands))
        // The token is checked before anything else of a request is read.
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), require_token))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared);
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "coordinator HTTP endpoint stopped");
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    value.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case("bearer ")).map(|_| &value[7..])
}

/// Logs a call refused for its token: the 1st, 10th, 100th, then every 1000th, so a flood of
/// them cannot flood the log.
pub(crate) fn note_refusal(channel: &str, peer: Option<std::net::SocketAddr>) {
    static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if [1, 10, 100].contains(&n) || n.is_multiple_of(1000) {
        let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        tracing::warn!(refused = n, %peer, "{channel} call without the job token refused");
    }
}

/// Compares tokens in time independent of where they differ.
pub(crate) fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

type Reply = Result<Response, (StatusCode, Json<Value>)>;

fn fail(status: StatusCode, message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (status, Json(json!({ "error": message.into() })))
}

fn from_status(s: tonic::Status) -> (StatusCode, Json<Value>) {
    let code = match s.code() {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => StatusCode::CONFLICT,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    fail(code, s.message())
}

async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorize(request.headers(), &shared) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
            note_refusal("HTTP", peer);
            refusal.into_response()
        }
    }
}

fn authorize(headers: &HeaderMap, shared: &Shared) -> Result<(), (StatusCode, Json<Value>)> {
    let given = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).or_else(|| bearer(headers));
    match given {
        Some(t) if same_token(t, &shared.token) => Ok(()),
        _ => Err(fail(StatusCode::UNAUTHORIZED, "missing or wrong job token (RTRAIN_JOB_TOKEN)")),
    }
}

/// Who is calling, as the body or query names it.
#[derive(Deserialize)]
struct Caller {
    role: String,
    rank: u32,
    attempt: u32,
}

impl Caller {
    fn id(&self) -> WorkerId {
        WorkerId { role: self.role.clone(), rank: self.rank, attempt: self.attempt }
    }
}

fn ok() -> Response {
    Json(json!({})).into_response()
}

async fn addresses(State(shared): State<Arc<Shared>>, Query(query): Query<HashMap<String, String>>) -> Reply {
    let reply = shared.lookup(query.get("role").map_or("", String::as_str));
    let endpoints: Vec<Value> = reply
        .endpoints
        .iter()
        .map(|e| json!({ "role": e.role, "rank": e.rank, "attempt": e.attempt, "addrs": e.addrs }))
        .collect();
    Ok(Json(json!({ "version": reply.version, "endpoints": endpoints })).into_response())
}

#[derive(Deserialize)]
struct Publish {
    #[serde(flatten)]
    caller: Caller,
    name: String,
    addr: String,
}

async fn publish(State(shared): State<Arc<Shared>>, Json(body): Json<Publish>) -> Reply {
    let req = PublishRequest { id: Some(body.caller.id()), name: body.name, addr: body.addr };
    shared.publish(&req).map_err(from_status)?;
    Ok(ok())
}

#[derive(Deserialize)]
struct Heartbeat {
    #[serde(flatten)]
    caller: Caller,
    #[serde(default)]
    step: u64,
}

async fn heartbeat(State(shared): State<Arc<Shared>>, Json(body): Json<Heartbeat>) -> Reply {
    shared.book().heartbeat(&body.caller.id(), body.step).map_err(|r| from_status(super::service::refused(r)))?;
    Ok(ok())
}

#[derive(Deserialize)]
struct Metrics {
    #[serde(flatten)]
    caller: Caller,
    #[serde(default)]
    step: u64,
    metrics: HashMap<String, f64>,
}

async fn metrics(State(shared): State<Arc<Shared>>, Json(body): Json<Metrics>) -> Reply {
    check_names(body.metrics.keys(), &["role", "rank", "attempt", "step", "time"])?;
    let report = MetricsReport { id: Some(body.caller.id()), step: body.step, metrics: body.metrics, time: unix_now() };
    shared.report_metrics(report).map_err(from_status)?;
    Ok(ok())
}

#[derive(Deserialize)]
struct Step {
    #[serde(flatten)]
    caller: Caller,
    step: u64,
    loss: f64,
    #[serde(default)]
    lr: f64,
    /// Tokens (or samples) the step processed, for throughput.
    #[serde(default)]
    tokens: f64,
    #[serde(default)]
    step_time_s: f64,
    #[serde(default)]
    grad_norm: f64,
    #[serde(default)]
    metrics: HashMap<String, f64>,
}

/// Names metrics.jsonl gives its own columns, which a reported metric may not take.
const STEP_COLUMNS: [&str; 12] = [
    "role",
    "rank",
    "step",
    "loss",
    "lr",
    "tokens_per_s",
    "time",
    "grad_norm",
    "step_time_s",
    "attempt",
    "restarts",
    "checkpoint_stall_s",
];

/// Refuses metrics named like a column of their metrics.jsonl line.
fn check_names<'a>(
    names: impl IntoIterator<Item = &'a String>,
    columns: &[&str],
) -> Result<(), (StatusCode, Json<Value>)> {
    match names.into_iter().find(|n| columns.contains(&n.as_str())) {
        Some(name) => Err(fail(StatusCode::BAD_REQUEST, format!("metric `{name}` has a column of its own; rename it"))),
        None => Ok(()),
    }
}

async fn step(State(shared): State<Arc<Shared>>, Json(body): Json<Step>) -> Reply {
    let numbers = [("loss", body.loss), ("lr", body.lr), ("tokens", body.tokens), ("step_time_s", body.step_time_s)];
    let bad =
        numbers.into_iter().chain(body.metrics.iter().map(|(k, v)| (k.as_str(), *v))).find(|(_, v)| !v.is_finite());
    if let Some((name, value)) = bad {
        return Err(fail(StatusCode::BAD_REQUEST, format!("`{name}` is {value}, not a finite number")));
    }
    if let Some((name, value)) = numbers.into_iter().skip(1).find(|(_, v)| *v < 0.0) {
        return Err(fail(StatusCode::BAD_REQUEST, format!("`{name}` is {value}; it cannot be negative")));
    }
    check_names(body.metrics.keys(), &STEP_COLUMNS)?;
    let id = body.caller.id();
    let metrics = StepMetrics {
        id: Some(id.clone()),
        step: body.step,
        loss: body.loss,
        lr: body.lr,
        tokens_per_s: if body.step_time_s > 0.0 { body.tokens / body.step_time_s } else { 0.0 },
        time: unix_now(),
        grad_norm: body.grad_norm,
        step_time_s: body.step_time_s,
        attempt: id.attempt,
        checkpoint_stall_s: None,
        extra: body.metrics,
        checkpoint_error: None,
    };
    shared.report_step(metrics).map_err(from_status)?;
    shared.book().heartbeat(&id, body.step).map_err(|r| from_status(super::service::refused(r)))?;
    Ok(ok())
}

#[derive(Deserialize)]
struct Broadcast {
    #[serde(flatten)]
    caller: Caller,
    to_role: String,
    to_rank: Option<u32>,
    kind: String,
    #[serde(default)]
    payload: Value,
}

async fn broadcast(State(shared): State<Arc<Shared>>, Json(body): Json<Broadcast>) -> Reply {
    let req = BroadcastRequest {
        id: Some(body.caller.id()),
        to_role: body.to_role,
        to_rank: body.to_rank,
        kind: body.kind,
        payload: if body.payload.is_null() { String::new() } else { body.payload.to_string() },
    };
    shared.broadcast(&req).map_err(from_status)?;
    Ok(ok())
}

async fn commands(State(shared): State<Arc<Shared>>, Query(caller): Query<Caller>) -> Reply {
    let id = shared.admit(Some(&caller.id())).map_err(from_status)?;
    let rx = shared.subscribe(&id);
    let lines = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |c| {
        let payload: Value = serde_json::from_str(&c.payload).unwrap_or(Value::String(c.payload.clone()));
        let line = json!({ "seq": c.seq, "kind": c.kind, "payload": payload, "from_role": c.from_role });
        Ok::<_, std::convert::Infallible>(format!("{line}\n"))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(lines))
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
