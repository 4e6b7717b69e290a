//! The dashboard a launch serves: its token, its JSON endpoints and Prometheus text over real
//! HTTP, and the page itself in a real headless browser (Chromium) during a live two-worker run.
//! The browser's screenshot is left in the tests' output folder (`target/tmp/dashboard.png`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

/// A plain HTTP/1.1 GET: the status code and the body.
fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the dashboard");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    stream.write_all(format!("{request}\r\n").as_bytes()).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    // Axum answers these with a length, not chunks, so the body is as sent.
    (code, body.to_string())
}

/// The dashboard URL the launch printed: (`127.0.0.1:PORT`, token).
fn printed_url(log: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(log).ok()?;
    let url = text.lines().find_map(|l| l.split("dashboard: ").nth(1))?.trim();
    let rest = url.strip_prefix("http://")?;
    let (addr, token) = rest.split_once("/?token=")?;
    Some((addr.to_string(), token.to_string()))
}

/// Chromium from Debian's package (scripts/test.sh installs it), if this machine has it.
fn browser() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let found = Command::new("which").arg(name).output().ok()?;
        found.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&found.stdout).trim()))
    })
}

/// Loads `url` in headless Chromium, lets its script run for a few (virtual) seconds, and
/// returns the DOM it built; with `screenshot`, also saves a PNG of the page there.
fn render(chromium: &Path, url: &str, profile: &Path, screenshot: Option<&Path>) -> String {
    let mut cmd = Command::new(chromium);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=6000")
        .arg("--window-size=1280,1800");
    match screenshot {
        Some(png) => cmd.arg(format!("--screenshot={}", png.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).stdin(Stdio::null()).output().expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_live_run_is_shown_by_its_dashboard_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "shown.toml", &tiny_gpt("shown", dir.path(), 2, 1, 1_000_000));
    let run_path = dir.path().join("shown");
    let log = dir.path().join("launch.log");
    let guard = spawn_logged(&["launch", cfg.to_str().unwrap()], &log);
    assert!(wait_until(LIMIT, || printed_url(&log).is_some()), "no dashboard URL printed");
    let (addr, token) = printed_url(&log).unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "served on loopback only: {addr}");
    assert!(wait_until(LIMIT, || metrics(&run_path).len() >= 5 && run_path.join("status.json").exists()), "no steps");

    // Without the token, or with another, nothing is shown.
    assert_eq!(get(&addr, "/api/status", &[]).0, 401);
    assert_eq!(get(&addr, "/?token=0123456789abcdef0123456789abcdef", &[]).0, 401);
    assert_eq!(get(&addr, "/metrics", &[("Authorization", "Bearer wrong")]).0, 401);
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    // status.json is rewritten every second: wait for one that has seen steps.
    let stepped = || {
        let (_, body) = get(&addr, "/api/status", &auth);
        serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|s| s["step"].as_u64().is_some())
    };
    assert!(wait_until(LIMIT, stepped), "status.json never shows a step");

    let (code, body) = get(&addr, "/api/status", &auth);
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["name"], "shown");
    assert_eq!(status["roles"]["trainer"]["size"], 2, "{status}");
    assert_eq!(status["dashboard"], format!("http://{addr}/"), "{status}");
    assert!(status["checkpoints"].is_array(), "{status}");

    let (code, body) = get(&addr, "/api/metrics?from=0", &auth);
    assert_eq!(code, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = page["rows"].as_array().unwrap();
    assert_eq!(page["next"].as_u64().unwrap() as usize, rows.len());
    assert!(rows.len() >= 5 && rows[0]["step"] == 1 && rows[0]["loss"].is_f64(), "{body}");
    let (_, body) = get(&addr, &format!("/api/metrics?from={}", rows.len()), &auth);
    let later: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(later["next"].as_u64().unwrap() >= rows.len() as u64, "{body}");

    let (code, body) = get(&addr, "/api/logs?role=trainer&rank=1&lines=50", &auth);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("joined the gang rank=1"), "{body}");
    assert_eq!(get(&addr, "/api/logs?role=nobody&rank=0", &auth).0, 404);
    // Nothing outside the run's logs: a role is a name, not a path.
    let secret = dir.path().join("secret-0.log");
    std::fs::write(&secret, "SECRET").unwrap();
    for role in [dir.path().join("secret").display().to_string(), "../../secret".into(), "..".into()] {
        let role: String = role.bytes().map(|b| format!("%{b:02X}")).collect();
        let (code, body) = get(&addr, &format!("/api/logs?role={role}&rank=0"), &auth);
        assert!(code == 404 && !body.contains("SECRET"), "{code} {body}");
    }
    // Looking at the run leaves its launch's lock in place: it is still seen running, and a
    // second launch of it is refused.
    let status = run(&["status", run_path.to_str().unwrap()], LIMIT);
    assert!(String::from_utf8_lossy(&status.stdout).starts_with("shown: running (rtrain pid "), "{status:?}");
    let second = run(&["launch", cfg.to_str().unwrap()], LIMIT);
    assert!(stderr(&second).contains("is in use by another launch"), "{}", stderr(&second));

    let (code, text) = get(&addr, "/metrics", &auth);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("# TYPE rtrain_step gauge"), "{text}");
    assert!(text.contains("rtrain_info{job=\"shown\",state=\"running\"} 1"), "{text}");
    assert!(text.contains("rtrain_process_running{job=\"shown\",role=\"trainer\",rank=\"1\"} 1"), "{text}");
    assert!(text.contains("rtrain_metric{job=\"shown\",role=\"trainer\",name=\"loss\"}"), "{text}");

    match browser() {
        Some(chromium) => {
            let url = format!("http://{addr}/?token={token}");
            let dom = render(&chromium, &url, &dir.path().join("profile"), None);
            assert!(dom.contains("data-loaded=\"1\""), "the page did not load its data:\n{dom}");
            assert!(dom.contains("<title>rtrain — shown</title>"), "{dom}");
            for rank in [0, 1] {
                assert!(dom.contains(&format!("data-role=\"trainer\" data-rank=\"{rank}\"")), "rank {rank}:\n{dom}");
            }
            for metric in ["loss", "lr", "tokens_per_s", "grad_norm"] {
                let at = dom.find(&format!("data-metric=\"{metric}\"")).unwrap_or_else(|| panic!("{metric}:\n{dom}"));
                let chart = &dom[at..dom[at..].find("</svg>").map_or(dom.len(), |end| at + end)];
                assert!(chart.contains("<polyline") || chart.contains("<path"), "{metric} has no line:\n{chart}");
            }
            assert!(dom.contains("joined the gang rank=0"), "the log tail is not shown:\n{dom}");
            let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
            let _ = std::fs::remove_file(&png);
            render(&chromium, &url, &dir.path().join("profile"), Some(&png));
            let shot = std::fs::read(&png).expect("a screenshot");
            assert!(shot.starts_with(b"\x89PNG") && shot.len() > 10_000, "{} bytes", shot.len());
            eprintln!("dashboard screenshot: {}", png.display());
        }
        None if std::env::var_os("RTRAIN_TEST_REQUIRE_ALL").is_some() => {
            panic!("no Chromium on this machine, though scripts/test.sh installs it (apt-get install chromium)")
        }
        None => eprintln!(
            "SKIPPED the browser half of this test: no Chromium installed (`apt-get install chromium`, as \
             scripts/test.sh does); the HTTP checks above ran"
        ),
    }

    let out = run(&["stop", run_path.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let launch = wait_output(guard, LIMIT);
    assert_eq!(launch.status.code(), Some(128 + libc::SIGTERM));
    // Once the launch is over, its dashboard is gone.
    assert!(TcpStream::connect(&addr).is_err(), "the dashboard outlived its launch");
}
