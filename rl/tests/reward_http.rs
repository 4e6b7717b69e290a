//! The HTTP reward against a real local server (a `TcpListener` thread answering scripted
//! replies): the request it sends, success, a retry after a 500, timeouts, refused connections,
//! and malformed answers, each failure naming the endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtrain_core::config::RewardSpec;
use rtrain_rl::reward::{EndpointFailure, HttpReward, RewardError};
use rtrain_rl::{RewardFn, RewardInput, Scored, build_reward};
use serde_json::{Map, Value, json};
use tch::Device;

/// What the server does with one connection.
enum Reply {
    Answer(u16, &'static str),
    /// Reads the request and never answers (until the client gives up).
    Hang,
}

struct Server {
    url: String,
    /// Request bodies received, in order.
    bodies: Arc<Mutex<Vec<String>>>,
}

/// Serves `replies`, one per connection, then stops accepting.
fn serve(replies: Vec<Reply>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for reply in replies {
            let Ok((mut stream, _)) = listener.accept() else { return };
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let Some(body) = read_request(&mut stream) else { return };
            seen.lock().unwrap().push(body);
            match reply {
                Reply::Answer(status, body) => {
                    let head = format!(
                        "HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes()));
                }
                // Returns when the client closes the connection (or after the read timeout).
                Reply::Hang => {
                    let _ = stream.read(&mut [0u8; 1]);
                }
            }
        }
    });
    Server { url, bodies }
}

/// The body of one HTTP/1.1 request with a Content-Length.
fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&data[..header_end]).to_ascii_lowercase();
    assert!(head.starts_with("post /score "), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Content-Length");
    while data.len() < header_end + length {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&data[header_end..header_end + length]).into_owned())
}

/// Runs `f` on its own thread; fails the test if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the test body finished within its limit (a panic in it is printed above)")
}

const LIMIT: Duration = Duration::from_secs(30);

fn records() -> Vec<Map<String, Value>> {
    vec![json!({"answer": "4", "id": 1}), json!({"answer": "9"})]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect()
}

/// Scores two samples against `url`.
fn score(url: &str, timeout: Duration, retries: u32) -> Result<Vec<Scored>, RewardError> {
    let records = records();
    let inputs = [
        RewardInput { prompt: "2+2=", response: "4", record: &records[0], ended: true },
        RewardInput { prompt: "3*3=", response: "nine ✓", record: &records[1], ended: true },
    ];
    HttpReward::new(url, timeout, retries).score(&inputs)
}

fn endpoint_failure(e: &RewardError) -> (&str, u32, &EndpointFailure) {
    match e {
        RewardError::Endpoint { url, attempts, failure } => (url.as_str(), *attempts, failure),
        other => panic!("not an endpoint error: {other}"),
    }
}

#[test]
fn scores_come_back_in_order_from_the_documented_request() {
    within(LIMIT, || {
        let server = serve(vec![Reply::Answer(200, r#"{"rewards": [1, -0.5], "correct": [true, null]}"#)]);
        let got = score(&server.url, Duration::from_secs(10), 0).unwrap();
        assert_eq!(got, [Scored { reward: 1.0, correct: Some(true) }, Scored { reward: -0.5, correct: None }]);
        let sent: Value = serde_json::from_str(&server.bodies.lock().unwrap()[0]).unwrap();
        assert_eq!(
            sent,
            json!({"items": [
                {"prompt": "2+2=", "response": "4", "record": {"answer": "4", "id": 1}},
                {"prompt": "3*3=", "response": "nine ✓", "record": {"answer": "9"}},
            ]})
        );

        // Built from the config's spec; `correct` may be left out; no items, no request.
        let server = serve(vec![Reply::Answer(200, r#"{"rewards": [0.25, 2e0]}"#)]);
        let spec = RewardSpec::Http { url: server.url.clone(), timeout: Duration::from_secs(10), retries: 0 };
        let mut reward = build_reward(&spec, Device::Cpu).unwrap();
        assert!(reward.score(&[]).unwrap().is_empty());
        let records = records();
        let inputs: Vec<RewardInput<'_>> =
            records.iter().map(|r| RewardInput { prompt: "p", response: "r", record: r, ended: true }).collect();
        let got = reward.score(&inputs).unwrap();
        assert_eq!(got, [Scored { reward: 0.25, correct: None }, Scored { reward: 2.0, correct: None }]);
        assert_eq!(server.bodies.lock().unwrap().len(), 1);
    });
}

#[test]
fn a_server_error_is_retried_then_succeeds() {
    within(LIMIT, || {
        let server = serve(vec![Reply::Answer(500, "boom"), Reply::Answer(200, r#"{"rewards": [0, 1]}"#)]);
        let got = score(&server.url, Duration::from_secs(10), 2).unwrap();
        assert_eq!(got.iter().map(|s| s.reward).collect::<Vec<_>>(), [0.0, 1.0]);
        let bodies = server.bodies.lock().unwrap();
        assert_eq!(bodies.len(), 2, "one failed attempt, one retry");
        assert_eq!(bodies[0], bodies[1], "the retry sends the same batch");
    });
}

#[test]
fn persistent_server_errors_name_the_endpoint_status_and_attempts() {
    within(LIMIT, || {
        let server = serve(vec![Reply::Answer(503, "overloaded"), Reply::Answer(503, "still overloaded")]);
        let e = score(&server.url, Duration::from_secs(10), 1).unwrap_err();
        let (url, attempts, failure) = endpoint_failure(&e);
        assert_eq!((url, attempts), (server.url.as_str(), 2));
        assert!(matches!(failure, EndpointFailure::Status { status: 503, body } if body == "still overloaded"));
        let text = e.to_string();
        assert!(
            text.contains(&server.url) && text.contains("HTTP status 503") && text.contains("2 attempts"),
            "{text}"
        );
        assert!(e.is_retryable());

        // A client error is not retried.
        let server = serve(vec![Reply::Answer(404, "no such route"), Reply::Answer(200, r#"{"rewards": [0, 1]}"#)]);
        let e = score(&server.url, Duration::from_secs(10), 3).unwrap_err();
        let (_, attempts, failure) = endpoint_failure(&e);
        assert_eq!(attempts, 1);
        assert!(matches!(failure, EndpointFailure::Status { status: 404, .. }), "{e}");
        assert!(!e.is_retryable());
    });
}

#[test]
fn a_silent_endpoint_times_out_on_every_attempt() {
    within(LIMIT, || {
        let server = serve(vec![Reply::Hang, Reply::Hang]);
        let timeout = Duration::from_millis(300);
        let e = score(&server.url, timeout, 1).unwrap_err();
        let (url, attempts, failure) = endpoint_failure(&e);
        assert_eq!((url, attempts), (server.url.as_str(), 2));
        assert!(matches!(failure, EndpointFailure::Timeout(t) if *t == timeout), "{e}");
        assert!(e.to_string().contains("no response within 300ms"), "{e}");
        assert_eq!(server.bodies.lock().unwrap().len(), 2, "both attempts reached the server");
    });
}

#[test]
fn a_refused_connection_names_the_endpoint() {
    within(LIMIT, || {
        // A port that was just free: nothing listens there.
        let url = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/score", listener.local_addr().unwrap())
        };
        let e = score(&url, Duration::from_secs(5), 1).unwrap_err();
        let (got_url, attempts, failure) = endpoint_failure(&e);
        assert_eq!((got_url, attempts), (url.as_str(), 2));
        assert!(matches!(failure, EndpointFailure::Connect(_)), "{e}");
        assert!(e.to_string().contains(&url) && e.to_string().contains("cannot connect"), "{e}");
    });
}

#[test]
fn malformed_answers_fail_at_once() {
    type Check = fn(&EndpointFailure) -> bool;
    let cases: [(&'static str, Check); 7] = [
        ("<html>oops</html>", |f| matches!(f, EndpointFailure::BadJson(_))),
        (r#"{"scores": [1, 1]}"#, |f| matches!(f, EndpointFailure::BadJson(m) if m.contains("rewards"))),
        (r#"{"rewards": [1]}"#, |f| matches!(f, EndpointFailure::WrongCount { expected: 2, got: 1 })),
        (r#"{"rewards": [1, 0, 1]}"#, |f| matches!(f, EndpointFailure::WrongCount { expected: 2, got: 3 })),
        (r#"{"rewards": [1, null]}"#, |f| matches!(f, EndpointFailure::NonFinite { index: 1, .. })),
        (r#"{"rewards": [NaN, 1]}"#, |f| matches!(f, EndpointFailure::NonFinite { .. })),
        (r#"{"rewards": [1, "1"]}"#, |f| matches!(f, EndpointFailure::BadJson(m) if m.contains("reward 1"))),
    ];
    for (body, expected) in cases {
        within(LIMIT, move || {
            // A second reply is ready, so a wrongly retried request would succeed.
            let server = serve(vec![Reply::Answer(200, body), Reply::Answer(200, r#"{"rewards": [1, 1]}"#)]);
            let e = score(&server.url, Duration::from_secs(10), 2).unwrap_err();
            let (url, attempts, failure) = endpoint_failure(&e);
            assert_eq!((url, attempts), (server.url.as_str(), 1), "{body}: {e}");
            assert!(expected(failure), "{body}: {e}");
            assert!(!e.is_retryable(), "{body}");
        });
    }
}
