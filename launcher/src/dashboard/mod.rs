//! The job's dashboard: a page served on loopback with the run's roles and ranks, attempts and
//! their causes, live charts of its metrics, checkpoints and a log tail, and a Prometheus text
//! endpoint beside it. Everything it shows comes from the run directory (`status.json`,
//! `metrics.jsonl`, `logs/`, `checkpoints/`), so the same server shows a live run (`rtrain
//! launch` starts it) or any run, live or finished (`rtrain dashboard RUN`).
//!
//! Every request needs the dashboard token: in the URL the launch prints (`/?token=…`, which also
//! sets a cookie for the page's own requests), or as `Authorization: Bearer …` (for Prometheus).
//! A launch's dashboard token is derived from the job token and only reads: the job token itself
//! is never printed.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /` | the page (its script and styles are part of it: nothing is fetched from elsewhere) |
//! | `GET /api/status` | `status.json`, with `checkpoints` (`step`, `name`, `metric`, `latest`, `time`) and `run_dir` |
//! | `GET /api/metrics?from=N` | `{"next", "rows"}`: lines `N..next` of `metrics.jsonl` (at most [`MAX_ROWS`]) |
//! | `GET /api/logs` | `{"files": [{"role", "rank", "file"}]}` |
//! | `GET /api/logs?role=R&rank=K&lines=L` | `{"role", "rank", "file", "text"}`: the last `L` lines of that log |
//! | `GET /metrics` | Prometheus text: progress, rank states, the latest value of every metric |

mod metrics_index;
mod prometheus;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::checkpoint::{self as store, LATEST_FILE};
use crate::coordinator::same_token;
use crate::launch::status::STATUS_FILE;
use metrics_index::MetricsIndex;

/// The page, with its script and styles.
const PAGE: &str = include_str!("page.html");
/// The most metrics lines one `/api/metrics` answer carries; the page asks again for the rest.
pub const MAX_ROWS: usize = 20_000;
/// The most log lines one `/api/logs` answer carries.
const MAX_LOG_LINES: usize = 2_000;
/// How much of the end of a log file is read for its tail.
const LOG_TAIL_BYTES: u64 = 256 * 1024;
const COOKIE: &str = "rtrain_dashboard";

/// A dashboard being served; it stops when dropped.
#[derive(Debug)]
pub struct Dashboard {
    pub addr: SocketAddr,
    token: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dashboard {
    /// Serves the dashboard of the run in `run` on `127.0.0.1:port` (0: a free port).
    pub async fn start(run: PathBuf, token: String, port: u16) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        let addr = listener.local_addr()?;
        let site = Arc::new(Site {
            metrics: Mutex::new(MetricsIndex::new(run.join(crate::run_dir::METRICS_FILE))),
            run,
            token: token.clone(),
        });
        let app = axum::Router::new()
            .route("/", get(page))
            .route("/api/status", get(status))
            .route("/api/metrics", get(metrics))
            .route("/api/logs", get(logs))
            .route("/metrics", get(prometheus))
            .route_layer(axum::middleware::from_fn_with_state(site.clone(), require_token))
            .with_state(site)
            .into_make_service_with_connect_info::<SocketAddr>();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "dashboard stopped");
            }
        });
        Ok(Self { addr, token, task })
    }

    /// The address to open, with the token.
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.token)
    }
}

/// A launch's dashboard token: derived from the job token (so nothing else needs storing), and
/// not the job token (which would let its holder act as a worker).
pub fn view_token(job_token: &str) -> String {
    let digest = crate::checkpoint::sha256_hex(format!("rtrain dashboard\n{job_token}").as_bytes());
    digest[..32].to_string()
}

struct Site {
    run: PathBuf,
    token: String,
    metrics: Mutex<MetricsIndex>,
}

type Reply = Result<Response, (StatusCode, Json<Value>)>;

fn fail(status: StatusCode, message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (status, Json(json!({ "error": message.into() })))
}

/// The token a request carries: `?token=`, the page's cookie, or a bearer header.
fn given_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    let from_query = query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| pair.strip_prefix("token="));
    let from_cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
    };
    let from_header = || {
        crate::coordinator::bearer(headers)
            .or_else(|| headers.get(crate::proto::TOKEN_HEADER).and_then(|v| v.to_str().ok()))
    };
    from_query.or_else(from_cookie).or_else(from_header)
}

async fn require_token(
    State(site): State<Arc<Site>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let query_token = request.uri().query().and_then(|q| q.split('&').find_map(|p| p.strip_prefix("token=")));
    let authorised = given_token(request.headers(), request.uri().query()).is_some_and(|t| same_token(t, &site.token));
    if !authorised {
        let peer = request.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0);
        crate::coordinator::note_refusal("dashboard", peer);
        let message = "not authorised: open the URL `rtrain launch` printed (it carries the dashboard token)";
        return (StatusCode::UNAUTHORIZED, Html(format!("<!doctype html><title>rtrain</title><p>{message}</p>")))
            .into_response();
    }
    // The page's own requests carry the token as a cookie from then on.
    let set_cookie = query_token
        .is_some()
        .then(|| HeaderValue::from_str(&format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", site.token)).ok())
        .flatten();
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Some(cookie) = set_cookie {
        headers.insert(header::SET_COOKIE, cookie);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn page() -> Response {
    let mut response = Html(PAGE).into_response();
    // The page runs its own inline script and talks to this server only.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src data:",
        ),
    );
    response
}

async fn status(State(site): State<Arc<Site>>) -> Reply {
    let run = site.run.clone();
    let body = tokio::task::spawn_blocking(move || run_status(&run))
        .await
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(body).into_response())
}

fn read_object(path: &Path) -> Option<Value> {
    std::fs::read(path).ok().and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok()).filter(Value::is_object)
}

/// The run's state with its checkpoints: `status.json` while its launch lives (or, before the
/// launch first writes it, `starting`); after, how it ended, from `summary.json` (runs from
/// before `status.json` existed have only that), and a launch that died without writing its end
/// is said to be gone.
pub fn run_status(run: &Path) -> Value {
    let live = crate::run_lock::holder(run).is_some();
    let status = read_object(&run.join(STATUS_FILE));
    let summary = read_object(&run.join(crate::run_dir::SUMMARY_FILE));
    let mut status = match (status, summary) {
        (Some(s), _) if live => s,
        (None, _) if live => json!({ "state": "starting" }),
        (status, Some(summary)) => {
            let mut s = status.unwrap_or_else(|| json!({}));
            s["state"] = summary.get("status").cloned().unwrap_or(json!("ended"));
            for (to, from) in [("step", "final_step"), ("loss", "final_loss"), ("tokens_per_s", "tokens_per_s")] {
                s[to] = summary.get(from).cloned().unwrap_or(Value::Null);
            }
            if s.get("attempts").is_none() {
                s["attempts"] = summary.get("attempts").cloned().unwrap_or(json!([]));
            }
            s["eta_s"] = Value::Null;
            s["dashboard"] = Value::Null;
            if s.get("total_steps").is_none_or(Value::is_null) {
                s["total_steps"] = configured_steps(run).map_or(Value::Null, |n| json!(n));
            }
            s
        }
        (Some(mut s), None) => {
            s["state"] = json!("gone (the launch ended without a summary: killed?)");
            s["dashboard"] = Value::Null;
            s
        }
        (None, None) if !run.is_dir() => json!({ "state": "missing (no run directory)" }),
        (None, None) => json!({ "state": "never started" }),
    };
    if status.get("name").is_none() {
        status["name"] = json!(run.file_name().map(|n| n.to_string_lossy().into_owned()));
    }
    status["checkpoints"] = Value::Array(checkpoints(run));
    status["run_dir"] = json!(run.display().to_string());
    status
}

/// `train.steps` of the run's config, for runs that predate `status.json`.
fn configured_steps(run: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(run.join("config.toml")).ok()?;
    let table: toml::Table = text.parse().ok()?;
    table.get("train")?.get("steps")?.as_integer()
}

fn checkpoints(run: &Path) -> Vec<Value> {
    let dir = run.join(crate::checkpoint::CHECKPOINTS_DIR);
    let latest = std::fs::read_to_string(dir.join(LATEST_FILE)).unwrap_or_default();
    store::list(run)
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let name = c.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let state = store::read_state(&c.path).ok();
            let time = std::fs::metadata(c.path.join(crate::checkpoint::MANIFEST_FILE))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64());
            json!({
                "step": c.step,
                "latest": latest.trim() == name,
                "name": name,
                "metric": state.and_then(|s| s.metric),
                "time": time,
            })
        })
        .collect()
}

async fn metrics(State(site): State<Arc<Site>>, Query(query): Query<HashMap<String, String>>) -> Reply {
    let from = match query.get("from").map(|f| f.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return Err(fail(StatusCode::BAD_REQUEST, "`from` must be a line number")),
    };
    let rows = tokio::task::spawn_blocking(move || {
        let mut index = site.metrics.lock().unwrap_or_else(|p| p.into_inner());
        index.refresh()?;
        index.rows(from, MAX_ROWS)
    })
    .await
    .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (next, rows) = rows.map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics.jsonl: {e}")))?;
    Ok(Json(json!({ "next": next, "rows": rows })).into_response())
}

async fn logs(State(site): State<Arc<Site>>, Query(query): Query<HashMap<String, String>>) -> Reply {
    let run = site.run.clone();
    let Some(role) = query.get("role").cloned() else {
        let files = tokio::task::spawn_blocking(move || log_files(&run))
            .await
            .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        return Ok(Json(json!({ "files": files })).into_response());
    };
    let rank = match query.get("rank").map(|r| r.parse::<usize>()) {
        None => 0,
        Some(Ok(r)) => r,
        Some(Err(_)) => return Err(fail(StatusCode::BAD_REQUEST, "`rank` must be a number")),
    };
    let lines = query.get("lines").and_then(|l| l.parse::<usize>().ok()).unwrap_or(200).min(MAX_LOG_LINES);
    let tail = tokio::task::spawn_blocking(move || {
        let path = crate::cli::log_path(&run, &role, rank)?;
        let text = tail(&path, lines).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = path.strip_prefix(&run).unwrap_or(&path).display().to_string();
        Ok::<_, String>(json!({ "role": role, "rank": rank, "file": file, "text": text }))
    })
    .await
    .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    tail.map(|t| Json(t).into_response()).map_err(|e| fail(StatusCode::NOT_FOUND, e))
}

/// The logs a run has: each role's processes, the training role's of its latest attempt.
fn log_files(run: &Path) -> Vec<Value> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(run.join("logs")) else { return files };
    let mut roles: Vec<String> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("attempt-") {
            roles.push(crate::config::TRAINING_ROLE.to_string());
        } else {
            roles.push(name);
        }
    }
    roles.sort();
    roles.dedup();
    for role in roles {
        for rank in 0.. {
            match crate::cli::log_path(run, &role, rank) {
                Ok(path) => {
                    let file = path.strip_prefix(run).unwrap_or(&path).display().to_string();
                    files.push(json!({ "role": role, "rank": rank, "file": file }));
                }
                Err(_) => break,
            }
        }
    }
    files
}

/// The last `lines` lines of a file (read from at most its last [`LOG_TAIL_BYTES`]).
fn tail(path: &Path, lines: usize) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    // A read that starts mid-file drops its first, partial line.
    let text = if start > 0 { text.split_once('\n').map_or("", |(_, rest)| rest) } else { &text };
    let kept: Vec<&str> = text.lines().collect();
    Ok(kept[kept.len().saturating_sub(lines)..].join("\n"))
}

async fn prometheus(State(site): State<Arc<Site>>) -> Reply {
    let text = tokio::task::spawn_blocking(move || {
        let status = run_status(&site.run);
        let mut index = site.metrics.lock().unwrap_or_else(|p| p.into_inner());
        index.refresh()?;
        Ok::<_, std::io::Error>(prometheus::exposition(&status, index.latest()))
    })
    .await
    .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics.jsonl: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_query_the_cookie_or_a_header() -> Result<(), Box<dyn std::error::Error>> {
        let mut headers = HeaderMap::new();
        assert_eq!(given_token(&headers, Some("from=3&token=abc")), Some("abc"));
        assert_eq!(given_token(&headers, Some("from=3")), None);
        headers.insert(header::COOKIE, HeaderValue::from_static("theme=dark; rtrain_dashboard=def"));
        assert_eq!(given_token(&headers, None), Some("def"));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer ghi"));
        assert_eq!(given_token(&headers, None), Some("ghi"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer jkl"));
        assert_eq!(given_token(&headers, None), Some("jkl"), "the scheme in any case");
        assert_ne!(view_token("a"), view_token("b"));
        assert_eq!(view_token("a").len(), 32);
        Ok(())
    }

    #[test]
    fn a_run_without_its_launch_shows_how_it_ended() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let run = dir.path();
        assert_eq!(run_status(run)["state"], "never started");
        // A launch killed before writing its end leaves a `running` status.json behind.
        std::fs::write(run.join(STATUS_FILE), r#"{"name": "r", "state": "running", "step": 7}"#)?;
        let gone = run_status(run);
        assert!(gone["state"].as_str().is_some_and(|s| s.starts_with("gone")), "{gone}");
        assert_eq!(gone["step"], 7);
        // An older run has only its summary.
        std::fs::remove_file(run.join(STATUS_FILE))?;
        std::fs::write(run.join("config.toml"), "[train]\nsteps = 40\n")?;
        std::fs::write(
            run.join("summary.json"),
            r#"{"status": "finished", "final_step": 40, "final_loss": 0.5, "attempts": [{"number": 0}]}"#,
        )?;
        let ended = run_status(run);
        assert_eq!(
            (&ended["state"], &ended["step"], &ended["total_steps"]),
            (&json!("finished"), &json!(40), &json!(40))
        );
        assert_eq!(ended["attempts"][0]["number"], 0);
        Ok(())
    }

    #[test]
    fn a_tail_keeps_the_last_lines() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.log");
        std::fs::write(&path, "one\ntwo\nthree\n")?;
        assert_eq!(tail(&path, 2)?, "two\nthree");
        assert_eq!(tail(&path, 10)?, "one\ntwo\nthree");
        Ok(())
    }
}
