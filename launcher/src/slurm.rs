//! Slurm: inside an allocation (`salloc`, `sbatch`), `rtrain launch` runs the job over the
//! allocation's hosts, asking Slurm's own tools which they are and starting one `rtrain agent` on
//! each of the others with `srun`; `rtrain slurm submit` writes the batch script that does this
//! and hands it to `sbatch`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{ClusterSpec, JobSpec};

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("cannot run `{program}` (is Slurm installed, and on PATH?): {source}")]
    Run { program: String, source: std::io::Error },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error(
        "cluster.hosts = {config} but the Slurm allocation has {allocated} nodes; leave cluster.hosts out \
         (the allocation decides) or allocate {config}"
    )]
    Hosts { config: usize, allocated: usize },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// The allocation this process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub job_id: String,
    /// Its nodes, as `scontrol show hostnames` lists them; this process runs on the first.
    pub nodes: Vec<String>,
}

/// The Slurm allocation around this process, if any (`SLURM_JOB_ID` and `SLURM_JOB_NODELIST`).
pub fn allocation() -> Result<Option<Allocation>, SlurmError> {
    let (Ok(job_id), Ok(list)) = (std::env::var("SLURM_JOB_ID"), std::env::var("SLURM_JOB_NODELIST")) else {
        return Ok(None);
    };
    let out = run(Command::new("scontrol").args(["show", "hostnames", &list]))?;
    let nodes = out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    Ok(Some(Allocation { job_id, nodes }))
}

fn run(cmd: &mut Command) -> Result<String, SlurmError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|source| SlurmError::Run { program: program.clone(), source })?;
    if !out.status.success() {
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        return Err(SlurmError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cluster settings of a job run inside `alloc`: its nodes are the hosts; the coordinator
/// listens on this node's address (Slurm chose the node, so `cluster.bind` gives only the port;
/// 0 takes a free one); the token is kept beside the run directory unless `cluster.token_file`
/// says where.
pub fn cluster_in(alloc: &Allocation, spec: &JobSpec) -> Result<ClusterSpec, SlurmError> {
    let configured = &spec.cluster;
    let allocated = alloc.nodes.len();
    if configured.hosts > 1 && configured.hosts != allocated {
        return Err(SlurmError::Hosts { config: configured.hosts, allocated });
    }
    let bind = SocketAddr::new(this_host_address(), configured.bind.port());
    let token_file = configured.token_file.clone().unwrap_or_else(|| {
        let mut name = spec.run_path.file_name().unwrap_or_default().to_os_string();
        name.push(".token");
        spec.run_path.with_file_name(name)
    });
    Ok(ClusterSpec { hosts: allocated, bind, token_file: Some(token_file), ..configured.clone() })
}

/// The first address of this host that is up and not loopback (IPv4 first); loopback if none.
pub fn this_host_address() -> IpAddr {
    let mut found: Vec<IpAddr> = Vec::new();
    // SAFETY: getifaddrs fills a list that is only read here and freed once.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return IpAddr::from([127, 0, 0, 1]);
        }
        let mut at = list;
        while !at.is_null() {
            let ifa = &*at;
            let up = ifa.ifa_flags & (libc::IFF_UP as u32) != 0 && ifa.ifa_flags & (libc::IFF_LOOPBACK as u32) == 0;
            if up && !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        found.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        // Link-local addresses need a scope to be reached; skip them.
                        if ip.segments()[0] & 0xffc0 != 0xfe80 {
                            found.push(IpAddr::V6(ip));
                        }
                    }
                    _ => {}
                }
            }
            at = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found.sort_by_key(|ip| ip.is_ipv6());
    found.first().copied().unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// `srun` starting one agent on every node of `alloc` but this one (the first), joining `join`.
pub fn agents_command(alloc: &Allocation, exe: &Path, join: SocketAddr, token_file: &Path, wait_s: f64) -> Command {
    let others = (alloc.nodes.len() - 1).to_string();
    let mut cmd = Command::new("srun");
    cmd.args(["--nodes", &others, "--ntasks", &others, "--ntasks-per-node", "1", "--relative", "1"])
        .args(["--overlap", "--kill-on-bad-exit=0", "--job-name", "rtrain-agents"])
        .arg(exe)
        .args(["agent", "--join", &join.to_string(), "--token-file"])
        .arg(token_file)
        .args(["--wait-s", &format!("{wait_s:.0}")]);
    cmd
}

/// What `rtrain slurm submit` asks of Slurm.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    pub nodes: usize,
    pub partition: Option<String>,
    pub time: Option<String>,
}

/// Refuses what would fail inside the allocation: a `cluster.hosts` other than `nodes`, and
/// sbatch values that are not one word.
pub fn check_submit(spec: &JobSpec, opts: &SubmitOptions) -> Result<(), String> {
    let hosts = spec.cluster.hosts;
    if hosts > 1 && hosts != opts.nodes {
        return Err(format!(
            "cluster.hosts = {hosts} but --nodes {}: leave cluster.hosts out (the allocation decides) or ask for {hosts} nodes",
            opts.nodes
        ));
    }
    for (flag, value) in [("--partition", &opts.partition), ("--time", &opts.time)] {
        if let Some(v) = value
            && (v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_:.,+".contains(&b)))
        {
            return Err(format!("{flag} `{}` is not a value sbatch takes", v.escape_debug()));
        }
    }
    Ok(())
}

/// The batch script of `spec` (its config at `config`, with `overrides`) for `rtrain launch` at
/// `exe`.
pub fn sbatch_script(spec: &JobSpec, config: &Path, overrides: &[String], exe: &Path, opts: &SubmitOptions) -> String {
    let quote = |p: &Path| shell_quote(&p.display().to_string());
    let output = spec.run_path.with_file_name(format!("{}.slurm-%j.out", spec.name));
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(&format!("#SBATCH --job-name={}\n", spec.name));
    s.push_str(&format!("#SBATCH --nodes={}\n", opts.nodes));
    s.push_str("#SBATCH --ntasks-per-node=1\n");
    // Each node's share of the gang (the first node's, the largest), and the driver's own core.
    if let Some(trainer) = spec.training_role() {
        let per_node = trainer.size.div_ceil(opts.nodes.max(1));
        let cpus = (per_node as f64 * trainer.cpus_per_worker).ceil() as usize + 1;
        s.push_str(&format!("#SBATCH --cpus-per-task={cpus}\n"));
        if trainer.gpus_per_worker > 0 {
            s.push_str(&format!("#SBATCH --gpus-per-node={}\n", per_node * trainer.gpus_per_worker));
        }
    }
    s.push_str(&format!("#SBATCH --output={}\n", output.display()));
    if let Some(p) = &opts.partition {
        s.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(t) = &opts.time {
        s.push_str(&format!("#SBATCH --time={t}\n"));
    }
    s.push_str(&format!(
        "# Written by `rtrain slurm submit`. On the first node, rtrain launch starts one agent on each\n\
         # other node with srun, and places the training gang over all {} of them.\n",
        opts.nodes
    ));
    s.push_str(&format!("cd {}\n", quote(&spec.working_dir)));
    let sets: String = overrides.iter().map(|o| format!(" --set {}", shell_quote(o))).collect();
    s.push_str(&format!("exec {} launch {}{sets}\n", quote(exe), quote(config)));
    s
}

/// Writes the batch script beside the run directory; returns its path.
pub fn write_script(spec: &JobSpec, script: &str) -> Result<PathBuf, SlurmError> {
    let path = spec.run_path.with_file_name(format!("{}.sbatch", spec.name));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| SlurmError::Write { path: dir.into(), source })?;
    }
    std::fs::write(&path, script).map_err(|source| SlurmError::Write { path: path.clone(), source })?;
    Ok(path)
}

/// Submits the batch script at `path`; returns Slurm's job id.
pub fn submit(path: &Path) -> Result<String, SlurmError> {
    let out = run(Command::new("sbatch").arg("--parsable").arg(path))?;
    Ok(out.trim().split(';').next().unwrap_or_default().to_string())
}

/// `text` as one word for bash.
fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b)) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_bash_only_when_they_need_it() {
        assert_eq!(shell_quote("/a/b-c.toml"), "/a/b-c.toml");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn submissions_that_would_fail_in_the_allocation_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        let cluster = "[train]\nworkers = 4\n[cluster]\nhosts = 2\nbind = \"10.0.0.1:29400\"\ntoken_file = \"t\"\n";
        std::fs::write(&path, cluster).unwrap();
        let spec = crate::config::load(&path, &[]).unwrap().spec;
        let opts = |nodes, time: Option<&str>| SubmitOptions { nodes, partition: None, time: time.map(String::from) };
        assert!(check_submit(&spec, &opts(3, None)).unwrap_err().contains("cluster.hosts = 2 but --nodes 3"));
        assert!(check_submit(&spec, &opts(2, Some("1:00\nrm -rf /"))).unwrap_err().contains("--time"));
        assert!(check_submit(&spec, &opts(2, Some("1-02:00:00"))).is_ok());
        // Each node asks for its share of the gang's cores (4 workers of 1 core over 2 nodes) and one.
        let script = sbatch_script(&spec, Path::new("/j.toml"), &[], Path::new("/bin/rtrain"), &opts(2, None));
        assert!(script.contains("#SBATCH --cpus-per-task=3\n"), "{script}");
        // Inside the allocation the node's own address replaces the one configured; the port stays.
        let alloc = Allocation { job_id: "1".into(), nodes: vec!["n1".into(), "n2".into()] };
        let c = cluster_in(&alloc, &spec).unwrap();
        assert_eq!((c.hosts, c.bind.port()), (2, 29400));
        assert_eq!(c.bind.ip(), this_host_address());
    }

    #[test]
    fn this_host_has_an_address() {
        // Loopback where there is no other interface; never an unspecified address.
        assert!(!this_host_address().is_unspecified());
    }
}
