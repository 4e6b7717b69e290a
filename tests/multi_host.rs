//! Jobs over several hosts, simulated: each host is a network namespace the test creates, joined
//! to the others by a bridge in a namespace of its own, with addresses the test assigns (10.99.0.x,
//! reachable from nowhere else). The driver runs in the first, `rtrain agent` in each other one;
//! traffic between them goes through the bridge, like traffic between machines. Needs root (to
//! make namespaces) and iproute2, which scripts/test.sh installs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The coordinator's port on the first host.
const PORT: u16 = 29400;

/// Network namespaces joined by a bridge; removed (with every process in them) when dropped.
struct Hosts {
    tag: String,
    count: usize,
}

impl Hosts {
    /// `count` hosts, or `None` (said on stderr) where namespaces cannot be made.
    fn new(count: usize, test: &str) -> Option<Self> {
        let root = unsafe { libc::geteuid() } == 0;
        let ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
        if !(root && ip) {
            let why =
                format!("{test}: needs root and iproute2 to make network namespaces (scripts/test.sh installs it)");
            assert!(std::env::var_os("RTRAIN_TEST_REQUIRE_ALL").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return None;
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hosts = Hosts { tag: format!("rt{}x{n}", std::process::id()), count };
        let bridge = hosts.bridge();
        sh(&["ip", "netns", "add", &bridge]);
        sh(&["ip", "-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &bridge, "link", "set", "br0", "up"]);
        for i in 0..count {
            let (ns, port) = (hosts.ns(i), format!("p{i}"));
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &bridge]);
            sh(&["ip", "-n", &bridge, "link", "set", &port, "master", "br0"]);
            sh(&["ip", "-n", &bridge, "link", "set", &port, "up"]);
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", hosts.addr(i)), "dev", "eth0"]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        Some(hosts)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.tag)
    }

    fn addr(&self, i: usize) -> String {
        format!("10.99.0.{}", i + 1)
    }

    /// `rtrain ARGS` in host `i`, its stderr in `log`.
    fn rtrain(&self, i: usize, args: &[&str], log: &Path) -> Guard {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), RTRAIN])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log.with_extension("out")).expect("log"))
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("start rtrain in a namespace");
        Guard(Some(child))
    }

    /// An agent in host `i` joining the driver in host 0, its cache beside its log.
    fn agent(&self, i: usize, token_file: &Path, log: &Path) -> Guard {
        let join = format!("{}:{PORT}", self.addr(0));
        let name = format!("host{i}");
        let cache = log.with_file_name(format!("cache{i}"));
        let args =
            ["agent", "--join", &join, "--token-file", path(token_file), "--name", &name, "--cache-dir", path(&cache)];
        self.rtrain(i, &args, log)
    }

    /// Names host `i` resolves, as a cluster's DNS would (`ip netns exec` shows the file as
    /// /etc/hosts inside the namespace).
    fn resolve(&self, i: usize, names: &[(&str, String)]) {
        let dir = Path::new("/etc/netns").join(self.ns(i));
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, addr) in names {
            text.push_str(&format!("{addr} {name}\n"));
        }
        std::fs::write(dir.join("hosts"), text).unwrap();
    }

    /// SIGKILLs every process in host `i`: its agent and its workers, as if it lost power.
    fn kill_all(&self, i: usize) -> usize {
        let out = Command::new("ip").args(["netns", "pids", &self.ns(i)]).output().expect("ip netns pids");
        let pids: Vec<i32> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect();
        for pid in &pids {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        pids.len()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..self.count {
            self.kill_all(i);
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(self.ns(i)));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge()]).status();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run ip");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A tiny GPT job of four workers, over `hosts` hosts (the driver's at 10.99.0.1) when more than 1;
/// `cpus` per worker (each simulated host has all of this machine's cores: with 1, two workers
/// fill a two-core host).
fn job(dir: &Path, name: &str, workers: &str, cpus: f64, hosts: usize, steps: u32) -> std::path::PathBuf {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cpus = cpus * cores / 2.0;
    let mut text = tiny_gpt(name, &dir.join("runs"), 4, 1, steps)
        .replace("workers = 4\n", &format!("workers = {workers}\ncpus_per_worker = {cpus}\n"));
    text.push_str("\n[checkpoint]\nevery = 5\n\n[rendezvous]\ntimeout_s = 30\n");
    if hosts > 1 {
        text.push_str(&format!(
            "\n[cluster]\nhosts = {hosts}\nbind = \"10.99.0.1:{PORT}\"\ntoken_file = \"secret/job.token\"\n"
        ));
    }
    write_config(dir, &format!("{name}.toml"), &text)
}

/// Loss per step of a run, in step order (the last attempt's value for a step seen twice).
fn losses(run: &Path) -> Vec<(u64, f64)> {
    let mut by_step = std::collections::BTreeMap::new();
    for m in metrics(run) {
        if let (Some(step), Some(loss)) = (m["step"].as_u64(), m["loss"].as_f64()) {
            by_step.insert(step, loss);
        }
    }
    by_step.into_iter().collect()
}

fn wait_exit(guard: Guard, limit: Duration, log: &Path) -> std::process::Output {
    let out = wait_output(guard, limit);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    eprintln!("--- {}:\n{text}", log.display());
    out
}

#[test]
fn two_hosts_of_two_workers_train_like_one_host_of_four_and_strangers_are_refused() {
    let Some(hosts) = Hosts::new(2, "two_hosts_of_two_workers") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The reference: four workers on one host. The model is big enough (≈250k parameters) that
    // the all-reduce between hosts is pipelined in pieces.
    let wider = |config: std::path::PathBuf| {
        let text = std::fs::read_to_string(&config).unwrap().replace("n_embd = 32", "n_embd = 128");
        std::fs::write(&config, text).unwrap();
        config
    };
    let one = wider(job(d, "one", "4", 0.5, 1, 12));
    let out = run(&["launch", path(&one)], Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));

    let two = wider(job(d, "two", "4", 0.5, 2, 12));
    let driver = hosts.rtrain(0, &["launch", path(&two)], &d.join("driver.log"));
    let token = d.join("secret/job.token");
    assert!(wait_until(Duration::from_secs(30), || token.exists() && d.join("secret/job.token.ca.pem").exists()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token).unwrap().permissions().mode() & 0o777, 0o600);

    // A stranger's token is refused, and so is a client that does not speak TLS.
    let wrong = d.join("wrong.token");
    std::fs::write(&wrong, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::copy(d.join("secret/job.token.ca.pem"), d.join("wrong.token.ca.pem")).unwrap();
    let stranger = hosts.agent(1, &wrong, &d.join("stranger.log"));
    let out = wait_exit(stranger, Duration::from_secs(60), &d.join("stranger.log"));
    assert_eq!(out.status.code(), Some(2));
    let said = std::fs::read_to_string(d.join("stranger.log")).unwrap();
    assert!(said.contains("refused this agent") && said.contains("token"), "{said}");
    let plain = Command::new("ip")
        .args(["netns", "exec", &hosts.ns(1), "python3", "-c"])
        .arg(format!(
            "import socket; s = socket.create_connection(('10.99.0.1', {PORT}), timeout=5); \
             s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + bytes(64)); \
             r = s.recv(64); print(r[:1].hex() if r else 'closed')"
        ))
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&plain.stdout).trim().to_string();
    // A TLS alert (0x15) or a closed connection: never an HTTP/2 frame.
    assert!(reply == "15" || reply == "closed", "plain text got {reply:?}: {}", String::from_utf8_lossy(&plain.stderr));

    let agent = hosts.agent(1, &token, &d.join("agent.log"));
    let out = wait_exit(driver, Duration::from_secs(180), &d.join("driver.log"));
    assert!(out.status.success(), "the driver failed");
    let agent_out = wait_exit(agent, Duration::from_secs(30), &d.join("agent.log"));
    assert!(agent_out.status.success(), "the agent did not leave cleanly with the job");
    let driver_said = std::fs::read_to_string(d.join("driver.log")).unwrap();
    assert!(driver_said.contains("hosts: this one and host1 (10.99.0.2)"), "{driver_said}");
    assert!(!driver_said.contains(&std::fs::read_to_string(&token).unwrap().trim().to_string()), "token printed");

    // Ranks 2 and 3 ran on the second host, with torchrun's numbers for it.
    let run = d.join("runs/two");
    let env_of = |rank: usize| std::fs::read_to_string(run.join(format!("logs/attempt-0/trainer-{rank}.log"))).unwrap();
    assert!(env_of(2).contains("backend=\"hierarchical\""), "{}", env_of(2));
    let a = losses(&d.join("runs/one"));
    let b = losses(&run);
    assert_eq!(a.len(), 12);
    assert_eq!(a.iter().map(|s| s.0).collect::<Vec<_>>(), b.iter().map(|s| s.0).collect::<Vec<_>>());
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "step {step}: one host {x}, two hosts {y}");
    }
}

/// A job of 150 steps training over two hosts, past its 12th step.
struct Training {
    driver: Guard,
    agent: Guard,
    /// The driver's output.
    log: std::path::PathBuf,
    run: std::path::PathBuf,
    token: std::path::PathBuf,
}

/// Starts job `name` of `workers` (one core each) in `d`: its driver in host 0, an agent in
/// host 1; returns once the run has logged step 12.
fn training(hosts: &Hosts, d: &Path, name: &str, workers: &str) -> Training {
    let config = job(d, name, workers, 1.0, 2, 150);
    let log = d.join("driver.log");
    let driver = hosts.rtrain(0, &["launch", path(&config)], &log);
    let token = d.join("secret/job.token");
    assert!(wait_until(Duration::from_secs(30), || d.join("secret/job.token.ca.pem").exists()));
    let agent = hosts.agent(1, &token, &d.join("agent1.log"));
    let run = d.join("runs").join(name);
    let reached = wait_until(Duration::from_secs(120), || losses(&run).last().is_some_and(|s| s.0 >= 12));
    assert!(reached, "no step 12:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    Training { driver, agent, log, run, token }
}

#[test]
fn an_elastic_gang_goes_on_over_the_hosts_left_when_one_dies() {
    let Some(hosts) = Hosts::new(2, "an_elastic_gang_goes_on") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Training { driver, agent: _agent, log, run, .. } =
        training(&hosts, dir.path(), "elastic", "{ min = 2, max = 4 }");
    assert!(hosts.kill_all(1) >= 3, "the agent and its two workers");

    let out = wait_exit(driver, Duration::from_secs(240), &log);
    assert!(out.status.success(), "the job did not survive the loss of a host");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("was lost with its host"), "{said}");
    assert!(said.contains("continuing on 1 of cluster.hosts = 2 hosts (lost: host1)"), "{said}");
    let summary = summary(&run);
    assert_eq!(summary["workers"], 2, "{summary}");
    assert_eq!(summary["global_batch"], 16, "the global batch of four workers is kept: {summary}");
    assert_eq!(summary["final_step"], 150);
    assert!(summary["attempts"][1]["resumed_from_step"].as_u64().is_some_and(|s| s >= 10), "{summary}");
}

#[test]
fn a_fixed_gang_waits_for_its_lost_host_to_come_back() {
    let Some(hosts) = Hosts::new(2, "a_fixed_gang_waits") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Training { driver, agent: _first, log, run, token } = training(&hosts, d, "fixed", "4");
    // `rtrain status` shows where each rank runs: ranks 2 and 3 on the agent's host.
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("status.json")).unwrap()).unwrap();
    let ranks = status["roles"]["trainer"]["ranks"].as_array().unwrap().clone();
    let hosts_of: Vec<(&str, &str)> =
        ranks.iter().map(|r| (r["host"].as_str().unwrap_or(""), r["state"].as_str().unwrap_or(""))).collect();
    assert_eq!(&hosts_of[2..], [("host1", "running"), ("host1", "running")], "{status}");
    assert!(ranks[0]["pid"].as_u64().is_some() && ranks[2]["pid"].is_null(), "{status}");
    hosts.kill_all(1);
    // The driver says it waits, and the host comes back.
    assert!(wait_until(Duration::from_secs(60), || std::fs::read_to_string(&log)
        .is_ok_and(|t| t.contains("for 1 more host(s)") && t.matches("waiting up to").count() >= 2)));
    let _again = hosts.agent(1, &token, &d.join("agent2.log"));

    let out = wait_exit(driver, Duration::from_secs(240), &log);
    assert!(out.status.success(), "the job did not resume once its host was back");
    let summary = summary(&run);
    assert_eq!(summary["workers"], 4, "{summary}");
    assert_eq!(summary["restarts"], 1, "{summary}");
    assert_eq!(summary["final_step"], 150);
    assert!(summary["attempts"][1]["resumed_from_step"].as_u64().is_some_and(|s| s >= 10), "{summary}");
}

#[test]
fn the_kubernetes_pods_commands_form_a_working_job() {
    use rtrain_launcher::k8s;
    let Some(hosts) = Hosts::new(2, "the_kubernetes_pods_commands") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = job(d, "kube", "4", 0.5, 1, 12);
    let out = run(
        &["k8s", "manifest", path(&config), "--nodes", "2", "--image", "rtrain:test", "--set", "train.steps=10"],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = k8s::Manifest::from_yaml(&stdout(&out)).expect("the printed manifest reads back");

    // What Kubernetes would mount: the Secret (mode 0400), the ConfigMap, the image's working
    // directory and the run volume, here as folders.
    use std::os::unix::fs::PermissionsExt;
    let mounts = [
        (k8s::SECRETS_DIR, d.join("secrets")),
        (k8s::CONFIG_DIR, d.join("config")),
        (k8s::RUNS_DIR, d.join("volume")),
        ("/workspace", d.join("workspace")),
    ];
    for (_, folder) in &mounts {
        std::fs::create_dir_all(folder).unwrap();
    }
    for (file, text) in manifest.secret.string_data.as_ref().unwrap() {
        let file = d.join("secrets").join(file);
        std::fs::write(&file, text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    for (file, text) in manifest.config.data.as_ref().unwrap() {
        std::fs::write(d.join("config").join(file), text).unwrap();
    }
    let pod = manifest.job.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let command: Vec<String> = pod.containers[0]
        .command
        .clone()
        .unwrap()
        .iter()
        .map(|arg| {
            let (key, value) = arg.split_once('=').map_or(("", arg.as_str()), |(k, v)| (k, v));
            let value = mounts
                .iter()
                .find(|(at, _)| value == *at || value.starts_with(&format!("{at}/")))
                .map_or(value.to_string(), |(at, folder)| format!("{}{}", folder.display(), &value[at.len()..]));
            if key.is_empty() { value } else { format!("{key}={value}") }
        })
        .collect();
    let name = "kube";
    hosts.resolve(1, &[(&format!("{name}-0.{name}"), hosts.addr(0))]);

    let pods: Vec<Guard> = (0..2)
        .map(|i| {
            let child = Command::new("ip")
                .args(["netns", "exec", &hosts.ns(i), RTRAIN])
                .args(&command[1..])
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .env("POD_IP", hosts.addr(i))
                .env("HOSTNAME", format!("{name}-{i}"))
                .env("RTRAIN_CACHE_DIR", d.join(format!("cache{i}")))
                .current_dir(d.join("workspace"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join(format!("pod{i}.log"))).unwrap())
                .spawn()
                .unwrap();
            Guard(Some(child))
        })
        .collect();
    for (i, pod) in pods.into_iter().enumerate() {
        let out = wait_exit(pod, Duration::from_secs(180), &d.join(format!("pod{i}.log")));
        assert!(out.status.success(), "pod {i} failed");
    }
    let run = d.join("volume").join(name);
    let summary = summary(&run);
    assert_eq!((summary["status"].as_str(), summary["workers"].as_u64()), (Some("finished"), Some(4)), "{summary}");
    assert_eq!(summary["final_step"], 10, "the manifest's --set reached the pods");
    let pod0 = std::fs::read_to_string(d.join("pod0.log")).unwrap();
    assert!(pod0.contains("hosts: this one and kube-1 (10.99.0.2)"), "{pod0}");
}

#[test]
fn the_working_directory_is_shipped_to_every_host_and_an_edit_reaches_the_next_launch() {
    let Some(hosts) = Hosts::new(2, "the_working_directory_is_shipped") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ws = d.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let script = |version: &str| {
        let who =
            "rank $RANK node $NODE_RANK group $GROUP_RANK local $LOCAL_RANK of $LOCAL_WORLD_SIZE world $WORLD_SIZE";
        format!("echo \"{who} version {version} in $(pwd)\"\nls -a\n")
    };
    std::fs::write(ws.join("train.sh"), script("v1")).unwrap();
    std::fs::write(ws.join(".gitignore"), "big.bin\n").unwrap();
    std::fs::write(ws.join("big.bin"), vec![0u8; 4096]).unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = write_config(
        &ws,
        "job.toml",
        &format!(
            "[job]\nname = \"ship\"\nentrypoint = [\"sh\", \"train.sh\"]\n\n[train]\nworkers = 2\ncpus_per_worker = {cpus}\n\n\
             [cluster]\nhosts = 2\nbind = \"10.99.0.1:{PORT}\"\ntoken_file = \"job.token\"\n"
        ),
    );
    let launch = |n: usize| {
        let log = d.join(format!("driver{n}.log"));
        let driver = hosts.rtrain(0, &["launch", path(&config), "--fresh"], &log);
        let token = ws.join("job.token");
        assert!(wait_until(Duration::from_secs(30), || ws.join("job.token.ca.pem").exists()));
        let agent = hosts.agent(1, &token, &d.join(format!("agent{n}.log")));
        assert!(wait_exit(driver, Duration::from_secs(120), &log).status.success());
        assert!(wait_exit(agent, Duration::from_secs(30), &d.join(format!("agent{n}.log"))).status.success());
        std::fs::remove_file(ws.join("job.token.ca.pem")).unwrap();
        let logs = ws.join("runs/ship/logs/attempt-0");
        (
            std::fs::read_to_string(logs.join("trainer-0.log")).unwrap(),
            std::fs::read_to_string(logs.join("trainer-1.log")).unwrap(),
        )
    };
    let (rank0, rank1) = launch(1);
    // Rank 0 runs in the working directory itself, rank 1 in the second host's copy of it,
    // with torchrun's numbers for two nodes of one process each.
    assert!(
        rank0.contains(&format!("rank 0 node 0 group 0 local 0 of 1 world 2 version v1 in {}", ws.display())),
        "{rank0}"
    );
    let copies = d.join("cache1/sessions");
    let copy = |line: &str| line.rsplit(" in ").next().unwrap_or("").trim().to_string();
    let line = rank1.lines().find(|l| l.starts_with("rank 1")).unwrap_or_default().to_string();
    assert!(line.starts_with("rank 1 node 1 group 1 local 0 of 1 world 2 version v1 in "), "{rank1}");
    assert!(copy(&line).starts_with(path(&copies)), "{line}");
    let shipped: Vec<&str> = rank1.lines().skip(1).collect();
    assert_eq!(shipped, [".", "..", ".gitignore", "job.toml", "train.sh"], "{rank1}");

    std::fs::write(ws.join("train.sh"), script("v2")).unwrap();
    let (_, rank1) = launch(2);
    assert!(rank1.contains("version v2"), "the edit did not reach the second host: {rank1}");
    // The agent keeps each version's archive, and removed its copies when it left.
    assert_eq!(std::fs::read_dir(d.join("cache1/archives")).unwrap().count(), 2, "one archive per version");
    assert_eq!(std::fs::read_dir(&copies).unwrap().count(), 0, "copies left behind");
}

#[test]
fn when_the_driver_is_killed_the_agents_stop_their_workers_and_leave() {
    let Some(hosts) = Hosts::new(2, "when_the_driver_is_killed") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Training { mut driver, agent, .. } = training(&hosts, dir.path(), "orphan", "4");
    let pids = |i: usize| {
        let out = Command::new("ip").args(["netns", "pids", &hosts.ns(i)]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().count()
    };
    assert!(pids(1) >= 3, "the agent and its two workers run");
    // `ip netns exec` execs rtrain itself: the child is the driver.
    driver.0.as_mut().unwrap().kill().unwrap();
    let out = wait_exit(agent, Duration::from_secs(60), &dir.path().join("agent1.log"));
    assert_eq!(out.status.code(), Some(1), "the agent says it lost its coordinator");
    let said = std::fs::read_to_string(dir.path().join("agent1.log")).unwrap();
    assert!(said.contains("lost the coordinator") && said.contains("stopped 2 process(es)"), "{said}");
    assert!(wait_until(Duration::from_secs(10), || pids(1) == 0), "processes left on the agent's host");
}
