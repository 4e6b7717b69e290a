//! Weight sync end to end through real `/dev/shm` segments, sockets and processes: bit-exact
//! round trips, no torn versions under racing publishes, refusals that name the tensor or the
//! token, cleanup, and subscribers that survive a publisher killed mid-write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtrain_rl::weight_sync::{
    FetchedWeights, ShmChannel, SyncOutcome, SyncedVersion, WeightClient, WeightPublisher, WeightServer,
    WeightServerConfig, WeightSubscriber, WeightSyncError,
};
use tch::{Device, Kind, Tensor};

type Named = Vec<(String, Tensor)>;

/// A channel name unique to this test run.
fn channel(test: &str) -> ShmChannel {
    ShmChannel::new(&format!("wstest{}-{test}", std::process::id()), "policy").unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    if n == 0 {
        return Vec::new();
    }
    unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), n) }.to_vec()
}

fn assert_bit_exact(got: &[(String, Tensor)], want: &[(String, Tensor)]) {
    assert_eq!(got.len(), want.len());
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        assert_eq!(gn, wn);
        assert_eq!(g.kind(), w.kind(), "{gn}");
        assert_eq!(g.size(), w.size(), "{gn}");
        assert!(bytes(g) == bytes(w), "{gn} differs");
    }
}

/// Several dtypes and shapes (a scalar, an empty tensor, odd sizes), with NaN, -0.0 and
/// subnormal bit patterns that a value comparison would miss.
fn mixed_weights(seed: i64) -> Named {
    tch::manual_seed(seed);
    let special = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
    let _ = special.get(0).get(0).fill_(f64::NAN);
    let _ = special.get(0).get(1).fill_(-0.0);
    let _ = special.get(0).get(2).fill_(1e-40);
    vec![
        ("embed.weight".into(), special),
        ("blocks.0.ln.weight".into(), Tensor::randn([7], (Kind::BFloat16, Device::Cpu))),
        ("blocks.0.attn.qkv".into(), Tensor::randn([2, 3, 4], (Kind::Half, Device::Cpu))),
        ("scale".into(), Tensor::randn([], (Kind::Double, Device::Cpu))),
        ("empty".into(), Tensor::zeros([0, 4], (Kind::Float, Device::Cpu))),
        ("positions".into(), Tensor::arange(1000, (Kind::Int64, Device::Cpu)) * seed),
        ("big".into(), Tensor::randn([257, 129], (Kind::Float, Device::Cpu))),
    ]
}

fn zeros_like(ws: &[(String, Tensor)]) -> Named {
    ws.iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect()
}

fn leftovers(channel: &ShmChannel) -> Vec<String> {
    let name = channel.path().file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|f| f.starts_with(&name))
        .collect()
}

#[test]
fn shm_round_trip_is_bit_exact_and_only_newer_versions_load() {
    let ch = channel("roundtrip");
    let mut sub = WeightSubscriber::new(&ch);
    let v1 = mixed_weights(1);
    let mut dst = zeros_like(&v1);
    assert_eq!(sub.sync_into(&mut dst).unwrap(), SyncOutcome::NotPublished, "no segment yet");

    let mut publisher = WeightPublisher::create(&ch, &v1).unwrap();
    assert!(ch.path().exists());
    assert_eq!(sub.sync_into(&mut dst).unwrap(), SyncOutcome::NotPublished, "segment, no version");
    publisher.publish(1, &v1).unwrap();
    let generation = publisher.generation();
    let loaded = sub.sync_into(&mut dst).unwrap();
    assert_eq!(loaded, SyncOutcome::Loaded { version: SyncedVersion { generation, version: 1 }, restarted: false });
    assert_bit_exact(&dst, &v1);
    assert_eq!(sub.sync_into(&mut dst).unwrap(), SyncOutcome::UpToDate(SyncedVersion { generation, version: 1 }));

    // Version 2 from a different order and a non-contiguous source, into a destination whose
    // first tensor is a non-contiguous view (staged, then copy_ in place: same storage).
    let v2 = mixed_weights(2);
    let mut reordered: Named = v2.iter().rev().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let big = v2[6].1.shallow_clone();
    reordered[0].1 = big.t_copy().t_(); // same values, column-major storage
    assert!(!reordered[0].1.is_contiguous());
    assert!(matches!(publisher.publish(2, &v1), Ok(())));
    assert!(matches!(publisher.publish(2, &v1), Err(WeightSyncError::VersionNotNewer { version: 2, last: 2 })));
    publisher.publish(3, &reordered).unwrap();
    let storage = Tensor::zeros([15], (Kind::Float, Device::Cpu));
    dst[0].1 = storage.view([5, 3]).t_(); // shape [3, 5], not contiguous
    let before = storage.data_ptr();
    assert!(matches!(
        sub.sync_into(&mut dst).unwrap(),
        SyncOutcome::Loaded { version: SyncedVersion { version: 3, .. }, .. }
    ));
    assert_eq!(storage.data_ptr(), before, "loaded in place");
    assert_bit_exact(&dst, &v2);
    assert!(bytes(&storage.view([5, 3]).t_()) == bytes(&v2[0].1));
    drop(publisher);
    assert!(leftovers(&ch).is_empty());
}

#[test]
fn tcp_round_trip_is_bit_exact_and_only_newer_versions_load() {
    let mut server = WeightServer::start(WeightServerConfig::new("127.0.0.1:0".parse().unwrap(), "job-token")).unwrap();
    let client = WeightClient::new(server.local_addr(), "job-token");
    assert!(matches!(client.fetch(None).unwrap(), FetchedWeights::NotPublished));

    let v1 = mixed_weights(3);
    server.publish(7, &v1).unwrap();
    let generation = server.generation();
    let FetchedWeights::Weights { version, tensors } = client.fetch(None).unwrap() else { panic!("no weights") };
    assert_eq!(version, SyncedVersion { generation, version: 7 });
    assert_bit_exact(&tensors, &v1);
    assert!(matches!(client.fetch(Some(version)).unwrap(), FetchedWeights::UpToDate(v) if v == version));
    // Another generation (a restarted trainer) always gets the weights.
    let stale = SyncedVersion { generation: generation ^ 1, version: 100 };
    assert!(matches!(client.fetch(Some(stale)).unwrap(), FetchedWeights::Weights { .. }));

    let v2 = mixed_weights(4);
    server.publish(8, &v2).unwrap();
    let mut dst = zeros_like(&v2);
    dst[0].1 = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu)).t_();
    let outcome = client.fetch_into(Some(version), &mut dst).unwrap();
    assert_eq!(outcome, SyncOutcome::Loaded { version: SyncedVersion { generation, version: 8 }, restarted: false });
    assert_bit_exact(&dst, &v2);
    let free =
        rtrain_rl::fetch_weights(server.local_addr(), b"job-token", Some(SyncedVersion { generation, version: 8 }));
    assert!(matches!(free.unwrap(), FetchedWeights::UpToDate(_)));
}

/// Fills every tensor with `version` (exact in f32 below 2^24).
fn pattern(version: u64, shapes: &[(&str, i64)]) -> Named {
    shapes
        .iter()
        .map(|(n, len)| (n.to_string(), Tensor::full([*len], version as f64, (Kind::Float, Device::Cpu))))
        .collect()
}

/// The single value every tensor holds, or a panic naming the mix.
fn uniform_version(ws: &[(String, Tensor)]) -> u64 {
    let mut seen = Vec::new();
    for (name, t) in ws {
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        assert_eq!(lo, hi, "{name} holds a mix of versions {lo}..{hi}");
        seen.push(lo);
    }
    assert!(seen.iter().all(|v| *v == seen[0]), "tensors of different versions: {seen:?}");
    seen[0] as u64
}

#[test]
fn a_reader_racing_rapid_publishes_never_sees_a_mixed_version() {
    let ch = channel("race");
    // ~3 MB per version: copies long enough for the publisher to lap a reader.
    let shapes = [("a", 262_144i64), ("b", 1), ("c", 524_287)];
    let mut publisher = WeightPublisher::create(&ch, &pattern(0, &shapes)).unwrap();
    publisher.publish(1, &pattern(1, &shapes)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(1));
    let writer = {
        let (stop, published) = (Arc::clone(&stop), Arc::clone(&published));
        std::thread::spawn(move || {
            let versions: Vec<Named> = (0..4).map(|v| pattern(v, &shapes)).collect();
            let mut v = 1u64;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                // Four prepared images cycle; the version number stays unique.
                let mut image =
                    versions[(v % 4) as usize].iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Named>();
                for (_, t) in &mut image {
                    let _ = t.fill_(v as f64);
                }
                publisher.publish(v, &image).unwrap();
                published.store(v, Ordering::Relaxed);
            }
            publisher
        })
    };
    let mut sub = WeightSubscriber::new(&ch).with_timeout(Duration::from_secs(20));
    let mut dst = pattern(0, &shapes);
    let (mut loads, mut last) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        match sub.sync_into(&mut dst).unwrap() {
            SyncOutcome::Loaded { version, .. } => {
                assert_eq!(uniform_version(&dst), version.version);
                assert!(version.version > last, "versions go forward");
                last = version.version;
                loads += 1;
            }
            SyncOutcome::UpToDate(_) => {}
            SyncOutcome::NotPublished => panic!("version 1 was published"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let publisher = writer.join().unwrap();
    let total = published.load(Ordering::Relaxed);
    eprintln!("{loads} loads while {total} versions were published");
    assert!(loads >= 10 && total > loads, "the race was exercised: {loads} loads, {total} publishes");
    drop(publisher);
}

#[test]
fn a_changed_tensor_set_is_refused_by_name() {
    let ch = channel("mismatch");
    let published: Named = vec![
        ("a".into(), Tensor::ones([4], (Kind::Float, Device::Cpu))),
        ("b".into(), Tensor::ones([2, 2], (Kind::BFloat16, Device::Cpu))),
    ];
    let mut publisher = WeightPublisher::create(&ch, &published).unwrap();
    publisher.publish(1, &published).unwrap();
    let mut server = WeightServer::start(WeightServerConfig::new("127.0.0.1:0".parse().unwrap(), "t")).unwrap();
    server.publish(1, &published).unwrap();
    let client = WeightClient::new(server.local_addr(), "t");

    let a = || ("a".to_string(), Tensor::zeros([4], (Kind::Float, Device::Cpu)));
    let cases: [(Named, &str, &str); 4] = [
        (vec![a(), ("c".into(), Tensor::zeros([2, 2], (Kind::BFloat16, Device::Cpu)))], "c", "not in the published"),
        (vec![a(), ("b".into(), Tensor::zeros([4], (Kind::BFloat16, Device::Cpu)))], "b", "shape"),
        (vec![a(), ("b".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)))], "b", "BFloat16"),
        (vec![a()], "b", "published but not among"),
    ];
    for (mut tensors, name, why) in cases {
        let mut sub = WeightSubscriber::new(&ch);
        for err in [sub.sync_into(&mut tensors).unwrap_err(), client.fetch_into(None, &mut tensors).unwrap_err()] {
            match &err {
                WeightSyncError::TensorSetMismatch { name: got, .. } => assert_eq!(got, name, "{err}"),
                other => panic!("expected a mismatch naming {name}, got {other}"),
            }
            assert!(err.to_string().contains(why) && err.to_string().contains(name), "{err}");
        }
        // Nothing was written.
        assert_eq!(tensors[0].1.sum(Kind::Float).double_value(&[]), 0.0);
        let err = publisher.publish(2, &tensors).unwrap_err();
        assert!(matches!(&err, WeightSyncError::TensorSetMismatch { name: got, .. } if got == name), "{err}");
    }
}

#[test]
fn wrong_tokens_are_refused_both_ways() {
    let mut server = WeightServer::start(WeightServerConfig::new("127.0.0.1:0".parse().unwrap(), "right")).unwrap();
    server.publish(1, &mixed_weights(5)).unwrap();
    let err = WeightClient::new(server.local_addr(), "wrong").fetch(None).unwrap_err();
    assert!(matches!(err, WeightSyncError::AuthFailed { detail: "the server refused this token", .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(matches!(
        WeightClient::new(server.local_addr(), "right").fetch(None).unwrap(),
        FetchedWeights::Weights { .. }
    ));

    // A server that does not know the token cannot feed a client weights.
    let rogue = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = rogue.local_addr().unwrap();
    let impostor = std::thread::spawn(move || {
        let (mut s, _) = rogue.accept().unwrap();
        let mut hello = b"RTRWSRV1\0".to_vec();
        hello.extend_from_slice(&[7u8; 32]);
        s.write_all(&hello).unwrap();
        let mut client_hello = [0u8; 89];
        s.read_exact(&mut client_hello).unwrap();
        let mut answer = vec![0u8]; // "nothing published" with a made-up proof
        answer.extend_from_slice(&[0u8; 32]);
        let _ = s.write_all(&answer);
    });
    let err = WeightClient::new(addr, "right").fetch(None).unwrap_err();
    assert!(matches!(err, WeightSyncError::AuthFailed { detail: "the server does not know the token", .. }), "{err}");
    impostor.join().unwrap();
}

#[test]
fn a_silent_client_does_not_stall_the_server() {
    let mut config = WeightServerConfig::new("127.0.0.1:0".parse().unwrap(), "tok");
    config.handshake_timeout = Duration::from_millis(300);
    let mut server = WeightServer::start(config).unwrap();
    server.publish(1, &mixed_weights(6)).unwrap();
    let mut silent = TcpStream::connect(server.local_addr()).unwrap();
    let start = Instant::now();
    let client =
        WeightClient::new(server.local_addr(), "tok").with_timeouts(Duration::from_secs(2), Duration::from_secs(2));
    assert!(matches!(client.fetch(None).unwrap(), FetchedWeights::Weights { .. }));
    assert!(start.elapsed() < Duration::from_millis(300), "served while the silent client sat: {:?}", start.elapsed());
    // The server hangs up on the silent one at its handshake deadline.
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = Vec::new();
    let _ = silent.read_to_end(&mut sink);
    assert_eq!(sink.len(), 41, "only the server's hello");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn segments_are_unlinked_when_the_publisher_drops() {
    let ch = channel("unlink");
    let ws = mixed_weights(7);
    let mut publisher = WeightPublisher::create(&ch, &ws).unwrap();
    publisher.publish(1, &ws).unwrap();
    let mut sub = WeightSubscriber::new(&ch);
    let mut dst = zeros_like(&ws);
    assert!(matches!(sub.sync_into(&mut dst).unwrap(), SyncOutcome::Loaded { .. }));
    assert_eq!(leftovers(&ch).len(), 1);
    drop(publisher);
    assert!(leftovers(&ch).is_empty(), "left in /dev/shm: {:?}", leftovers(&ch));
    let err = sub.sync_into(&mut dst).unwrap_err();
    assert!(matches!(err, WeightSyncError::SegmentGone { last_version: Some(1), .. }), "{err}");
    assert!(err.is_retryable());
    assert_bit_exact(&dst, &ws);
}

#[test]
fn a_too_small_dev_shm_fails_up_front() {
    let ch = channel("toobig");
    // 2^42 floats (16 TiB) by shape, stride 0: nothing that size is ever allocated in memory.
    let huge = vec![("w".to_string(), Tensor::zeros([1], (Kind::Float, Device::Cpu)).expand([1i64 << 42], false))];
    let err = WeightPublisher::create(&ch, &huge).unwrap_err();
    assert!(matches!(err, WeightSyncError::ShmTooSmall { .. }), "{err}");
    assert!(err.to_string().contains("--shm-size"), "{err}");
    assert!(leftovers(&ch).is_empty(), "{:?}", leftovers(&ch));
}

const CHILD_ENV: &str = "RTRAIN_WEIGHT_SYNC_CHILD_JOB";
const CHILD_SHAPES: [(&str, i64); 2] = [("w", 1 << 20), ("v", 4097)];

/// Runs only when re-executed by `a_killed_publisher_does_not_hang_subscribers`: publishes
/// versions over shm and TCP as fast as it can until it is killed.
#[test]
fn killed_publisher_child() {
    let Ok(job) = std::env::var(CHILD_ENV) else { return };
    let ch = ShmChannel::new(&job, "policy").unwrap();
    let mut publisher = WeightPublisher::create(&ch, &pattern(0, &CHILD_SHAPES)).unwrap();
    let mut server = WeightServer::start(WeightServerConfig::new("127.0.0.1:0".parse().unwrap(), "tok")).unwrap();
    let mut image = pattern(0, &CHILD_SHAPES);
    for v in 1u64.. {
        for (_, t) in &mut image {
            let _ = t.fill_(v as f64);
        }
        publisher.publish(v, &image).unwrap();
        server.publish(v, &image).unwrap();
        if v == 1 {
            println!("port {}", server.local_addr().port());
        }
    }
}

/// Kills the child on every exit path of the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_publisher_does_not_hang_subscribers() {
    let job = format!("wstest{}-killed", std::process::id());
    let ch = ShmChannel::new(&job, "policy").unwrap();
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "killed_publisher_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &job)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let port = read_port(child.0.stdout.take().unwrap(), Duration::from_secs(60));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let mut sub = WeightSubscriber::new(&ch).with_timeout(Duration::from_secs(2));
    let client = WeightClient::new(addr, "tok").with_timeouts(Duration::from_secs(2), Duration::from_secs(2));
    let mut dst = pattern(0, &CHILD_SHAPES);
    let mut fetched = pattern(0, &CHILD_SHAPES);
    let mut held = None;
    for _ in 0..5 {
        if let SyncOutcome::Loaded { version, .. } = sub.sync_into(&mut dst).unwrap() {
            assert_eq!(uniform_version(&dst), version.version);
        }
        if let SyncOutcome::Loaded { version, .. } = client.fetch_into(held, &mut fetched).unwrap() {
            assert_eq!(uniform_version(&fetched), version.version);
            held = Some(version);
        }
    }
    assert!(sub.publisher_alive() == Some(true));
    // Killed mid-write with high probability: it publishes back to back.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(sub.publisher_alive() == Some(false));

    // The segment stays (nobody unlinked it); every sync returns at once with the last complete
    // version, never a torn one.
    let last = sub.held().unwrap().version;
    for _ in 0..3 {
        let start = Instant::now();
        match sub.sync_into(&mut dst).unwrap() {
            SyncOutcome::Loaded { version, .. } => {
                assert!(uniform_version(&dst) == version.version && version.version > last)
            }
            SyncOutcome::UpToDate(_) => assert_eq!(uniform_version(&dst), sub.held().unwrap().version),
            SyncOutcome::NotPublished => panic!("versions were published"),
        }
        assert!(start.elapsed() < Duration::from_secs(1), "sync took {:?}", start.elapsed());
    }
    // Over TCP the fetch fails at once with a retryable error.
    let start = Instant::now();
    let err = client.fetch_into(held, &mut fetched).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));

    // A restarted publisher replaces the leftover segment; its lower version is still taken.
    let mut restarted = WeightPublisher::create(&ch, &pattern(0, &CHILD_SHAPES)).unwrap();
    restarted.publish(1, &pattern(1, &CHILD_SHAPES)).unwrap();
    let outcome = sub.sync_into(&mut dst).unwrap();
    assert!(
        matches!(outcome, SyncOutcome::Loaded { version: SyncedVersion { version: 1, .. }, restarted: true }),
        "{outcome:?}"
    );
    assert_eq!(uniform_version(&dst), 1);
    drop(restarted);
    assert!(leftovers(&ch).is_empty(), "{:?}", leftovers(&ch));
}

fn read_port(stdout: std::process::ChildStdout, timeout: Duration) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness's "test name ... " precedes the child's line.
            if let Some((_, port)) = line.rsplit_once("port ") {
                let _ = tx.send(port.trim().parse::<u16>().unwrap());
                return;
            }
        }
    });
    rx.recv_timeout(timeout).expect("the child publisher did not start")
}
