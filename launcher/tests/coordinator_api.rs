//! The coordinator's two front ends over real sockets: the Rust client (gRPC) and the HTTP/JSON
//! endpoint a Python script uses. Both see one address book and one command stream, and both
//! refuse a caller without the job token or from a stale attempt.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rtrain_launcher::contract::WorkerEnv;
use rtrain_launcher::coordinator::{CoordinatorEvent, CoordinatorHandle, start_coordinator};
use rtrain_launcher::job_client::JobClient;
use tokio::sync::mpsc::UnboundedReceiver;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn start() -> (tokio::runtime::Runtime, CoordinatorHandle, UnboundedReceiver<CoordinatorEvent>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (handle, events) = rt
        .block_on(start_coordinator(SocketAddr::from(([127, 0, 0, 1], 0)), TOKEN.into(), Some("trainer".into())))
        .unwrap();
    handle.add_role("actor", 2, false, 0);
    handle.begin_attempt("trainer", 0, 1);
    (rt, handle, events)
}

fn client(handle: &CoordinatorHandle, role: &str, rank: usize, attempt: u32) -> JobClient {
    let (addr, attempt) = (handle.addr.to_string(), attempt.to_string());
    let env = WorkerEnv::from_lookup(|k| match k {
        "RANK" | "LOCAL_RANK" => Some(rank.to_string()),
        "WORLD_SIZE" => Some("2".into()),
        "RTRAIN_ROLE" => Some(role.into()),
        "RTRAIN_ATTEMPT" => Some(attempt.clone()),
        "RTRAIN_COORDINATOR" => Some(addr.clone()),
        "RTRAIN_JOB_TOKEN" => Some(TOKEN.into()),
        "RTRAIN_CONFIG" => Some("job.toml".into()),
        _ => None,
    })
    .unwrap();
    JobClient::new(&env).unwrap()
}

/// One HTTP/1.1 request; returns the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn the_address_book_and_events_are_shared_by_grpc_and_http_callers() {
    let (_rt, handle, mut events) = start();
    let http_addr = handle.http_addr;
    let trainer = client(&handle, "trainer", 0, 0);
    trainer.publish("data", "127.0.0.1:4242").unwrap();

    // A Python-style caller finds it over HTTP.
    let (status, body) = http(http_addr, "GET", "/v1/addresses?role=trainer", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let book: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(book["endpoints"][0]["addrs"]["data"], "127.0.0.1:4242");

    // ... and publishes its own address, which the Rust client sees.
    let who = r#""role": "actor", "rank": 1, "attempt": 0"#;
    let (status, body) = http(
        http_addr,
        "POST",
        "/v1/publish",
        Some(TOKEN),
        &format!(r#"{{{who}, "name": "svc", "addr": "127.0.0.1:1"}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let seen = trainer.lookup("actor").unwrap();
    assert_eq!(seen.addr("actor", 1, "svc"), Some("127.0.0.1:1"));

    // Events: the trainer broadcasts to the actors; a gRPC subscriber and an HTTP stream both get it.
    let actor0 = client(&handle, "actor", 0, 0);
    let commands = actor0.commands().unwrap();
    let mut stream = TcpStream::connect(http_addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "GET /v1/commands?role=actor&rank=1&attempt=0 HTTP/1.1\r\nhost: x\r\nx-rtrain-token: {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let mut lines = BufReader::new(stream);
    let mut head = String::new();
    while lines.read_line(&mut head).unwrap() > 0 && !head.ends_with("\r\n\r\n") {}
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Both subscriptions are in place: the server subscribes before it answers either call.
    trainer.broadcast("actor", None, "weights", r#"{"version": 3}"#).unwrap();
    let got = commands.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        (got.kind.as_str(), got.payload.as_str(), got.from_role.as_str()),
        ("weights", r#"{"version": 3}"#, "trainer")
    );
    let mut line = String::new();
    // Chunked encoding: a size line, then the JSON line.
    while !line.contains("weights") {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "stream ended");
    }
    let event: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!((event["kind"].as_str(), event["payload"]["version"].as_u64()), (Some("weights"), Some(3)));

    // A command to one rank reaches only that rank.
    handle.send("actor", Some(1), "pause", "");
    trainer.broadcast("actor", Some(0), "resume", "").unwrap();
    assert_eq!(commands.recv_timeout(Duration::from_secs(10)).unwrap().kind, "resume");

    // Named metrics of any role reach the driver.
    actor0.report_metrics(7, &[("samples_per_s", 12.5)]).unwrap();
    let (status, _) =
        http(http_addr, "POST", "/v1/metrics", Some(TOKEN), &format!(r#"{{{who}, "metrics": {{"x": 1}}}}"#));
    assert_eq!(status, 200);
    let mut named = Vec::new();
    while named.len() < 2 {
        match events.try_recv() {
            Ok(CoordinatorEvent::Metrics(m)) => named.push(m),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    assert_eq!(named[0].metrics["samples_per_s"], 12.5);
    assert_eq!(named[1].id.as_ref().map(|id| id.rank), Some(1));
}

#[test]
fn callers_without_the_token_or_from_a_stale_attempt_are_refused() {
    let (_rt, handle, _events) = start();
    let http_addr = handle.http_addr;
    assert_eq!(http(http_addr, "GET", "/v1/addresses", None, "").0, 401);
    assert_eq!(http(http_addr, "GET", "/v1/addresses", Some("0123456789abcdef0123456789abcdeX"), "").0, 401);
    // The token is checked before the body is read: no parse errors for strangers.
    assert_eq!(http(http_addr, "POST", "/v1/publish", None, "not json").0, 401);
    assert_eq!(http(http_addr, "GET", "/v1/commands?role=actor", None, "").0, 401);
    let stale = r#"{"role": "actor", "rank": 1, "attempt": 0, "name": "svc", "addr": "a:1"}"#;
    handle.restart_rank("actor", 1, 1);
    let (status, body) = http(http_addr, "POST", "/v1/publish", Some(TOKEN), stale);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("stale"), "{body}");
    let (status, _) = http(
        http_addr,
        "POST",
        "/v1/metrics",
        Some(TOKEN),
        r#"{"role": "critic", "rank": 0, "attempt": 0, "metrics": {}}"#,
    );
    assert_eq!(status, 400);
    let (status, _) = http(http_addr, "POST", "/v1/publish", Some(TOKEN), "not json");
    assert!((400..500).contains(&status));

    // Only rank 0 of the training role reports training steps.
    let actor = client(&handle, "actor", 0, 0);
    let wrong_token = {
        let mut env = WorkerEnv::from_lookup(|k| match k {
            "RANK" | "LOCAL_RANK" | "RTRAIN_ATTEMPT" => Some("0".into()),
            "WORLD_SIZE" => Some("2".into()),
            "RTRAIN_ROLE" => Some("actor".into()),
            "RTRAIN_COORDINATOR" => Some(handle.addr.to_string()),
            "RTRAIN_JOB_TOKEN" => Some("wrong".into()),
            "RTRAIN_CONFIG" => Some("job.toml".into()),
            _ => None,
        })
        .unwrap();
        env.token = "wrong".into();
        JobClient::new(&env).unwrap()
    };
    let e = wrong_token.lookup("").unwrap_err().to_string();
    assert!(e.contains("token"), "{e}");
    let e = actor.broadcast("nobody", None, "x", "").unwrap_err().to_string();
    assert!(e.contains("unknown role `nobody`"), "{e}");
}

#[test]
fn a_heartbeat_stream_is_recorded_until_its_attempt_is_retired() {
    use rtrain_launcher::proto::coordinator_client::CoordinatorClient;
    use rtrain_launcher::proto::{HeartbeatRequest, TokenInterceptor, WorkerId};

    let (rt, handle, _events) = start();
    let channel =
        rt.block_on(tonic::transport::Endpoint::from_shared(format!("http://{}", handle.addr)).unwrap().connect());
    let mut grpc = CoordinatorClient::with_interceptor(channel.unwrap(), TokenInterceptor::new(TOKEN).unwrap());
    let id = WorkerId { role: "trainer".into(), rank: 0, attempt: 0 };
    let (beat, beats) = tokio::sync::mpsc::channel(4);
    let call = rt.spawn(async move { grpc.heartbeats(tokio_stream::wrappers::ReceiverStream::new(beats)).await });
    let send = |id: Option<WorkerId>, step| rt.block_on(beat.send(HeartbeatRequest { id, step })).unwrap();

    send(Some(id.clone()), 1);
    send(None, 2);
    let step_seen = |step| {
        (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            handle.heartbeats("trainer").get(&0).map(|(_, s)| *s) == Some(step)
        })
    };
    assert!(step_seen(2), "later beats need not name the worker");

    // A new attempt retires the stream: its next beat ends the call as a stale caller's would.
    handle.begin_attempt("trainer", 1, 1);
    send(None, 3);
    let status = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), call).await }).unwrap().unwrap();
    let status = status.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("stale"), "{}", status.message());
    assert!(handle.heartbeats("trainer").is_empty(), "the new attempt has not beaten");
}
