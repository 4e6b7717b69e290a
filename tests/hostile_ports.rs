//! Whatever a live job listens on (the coordinator's gRPC and HTTP ports; its workers listen on
//! nothing once their ring is formed) refuses garbage, unauthenticated calls and oversized bodies
//! on that connection alone: the job trains on, and the refusals are logged.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

/// `NAME=value` from a process's environment.
fn env_of(pid: u32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}=")).map(str::to_string)
    })
}

/// The TCP ports `pid` listens on (from `ss`).
fn listening_ports(pid: u32) -> Vec<u16> {
    let out = Command::new("ss").args(["-ltnpH"]).output().expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit(':').next()?.parse().ok())
        .collect()
}

/// Sends `bytes` on a fresh connection and reads whatever comes back until the peer closes it
/// (or a few seconds pass).
fn send(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(addr) else { return Vec::new() };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    reply
}

fn garbage(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

#[test]
fn garbage_and_strangers_on_every_port_leave_the_job_training() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.toml", &tiny_gpt("hostile", dir.path(), 2, 1, 1_000_000));
    let run_path = dir.path().join("hostile");
    let log = dir.path().join("launch.log");
    let guard = spawn_logged(&["launch", cfg.to_str().unwrap()], &log);
    assert!(wait_until(LIMIT, || metrics(&run_path).len() >= 5), "no steps");
    let rank0 = pid_of(&run_path, "trainer", 0).expect("rank 0");
    let grpc = env_of(rank0, "RTRAIN_COORDINATOR").expect("coordinator address");
    let grpc = grpc.trim_start_matches("http://").to_string();
    let http = env_of(rank0, "RTRAIN_HTTP").expect("HTTP address");
    let http = http.trim_start_matches("http://").to_string();
    // Once their ring is formed, workers listen on nothing (garbage during the ring's forming is
    // the collective tests' business): what a live job listens on is its coordinator.
    for rank in [0, 1] {
        let pid = pid_of(&run_path, "trainer", rank).unwrap();
        assert_eq!(listening_ports(pid), [] as [u16; 0], "rank {rank} listens");
    }
    let targets = [grpc.clone(), http.clone()];
    for (i, addr) in targets.iter().enumerate() {
        for n in [1, 64, 100_000] {
            send(addr, &garbage(n, (i * 7 + n) as u64));
        }
        // A connection that opens and closes, and one that says nothing and waits.
        drop(TcpStream::connect(addr));
    }
    // HTTP without the token, with another job's, and with a body past the limit.
    let request = |token: &str, body: &str| {
        format!(
            "POST /v1/step HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
             x-rtrain-token: {token}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = String::from_utf8_lossy(&send(&http, request("not-the-token", "{}").as_bytes())).into_owned();
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    let token = env_of(rank0, "RTRAIN_JOB_TOKEN").expect("token");
    let huge = format!(
        "{{\"role\":\"trainer\",\"rank\":0,\"attempt\":0,\"step\":1,\"loss\":1,\"pad\":\"{}\"}}",
        "x".repeat(3 << 20)
    );
    let reply = String::from_utf8_lossy(&send(&http, request(&token, &huge).as_bytes())).into_owned();
    assert!(reply.starts_with("HTTP/1.1 413"), "{}", &reply[..reply.len().min(200)]);

    // The job goes on: more steps, on the same attempt, with no restart.
    let seen = metrics(&run_path).len();
    assert!(wait_until(LIMIT, || metrics(&run_path).len() >= seen + 20), "training stopped");
    let out = run(&["stop", run_path.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let launch = wait_output(guard, LIMIT);
    assert_eq!(launch.status.code(), Some(128 + libc::SIGTERM));
    let s = summary(&run_path);
    assert_eq!(s["restarts"], 0, "{s}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("HTTP call without the job token refused"), "{text}");
    assert!(!text.contains(&token), "the job token is never printed");
}
