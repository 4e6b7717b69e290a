//! What a launch over several hosts prepares before anything starts, and the agents it starts
//! itself inside a Slurm allocation: the job token (from its file, or a new one), the TLS identity
//! of the coordinator, and the packed working directory.

use std::path::Path;

use super::{JobContext, LaunchError};
use crate::agent::SpawnError;
use crate::cluster::{JobTls, ca_path, token_from_file};
use crate::config::{ClusterSpec, JobSpec};
use crate::worker_env::job_token;
use crate::working_dir::Bundle;

/// The token every call carries; beyond one host, the coordinator's TLS identity and the
/// working directory to ship.
pub(super) struct Prepared {
    pub token: String,
    pub tls: Option<JobTls>,
    pub bundle: Option<Bundle>,
}

pub(super) fn prepare(spec: &JobSpec, cluster: &ClusterSpec) -> Result<Prepared, LaunchError> {
    let token = match &cluster.token_file {
        Some(path) => token_from_file(path, &job_token())?,
        None => job_token(),
    };
    // Beyond one host the control plane crosses the network: TLS, with a CA made for this launch.
    let tls = match (&cluster.tls, cluster.multi_host()) {
        (Some(files), true) => Some(JobTls::from_files(files)?),
        (None, true) => {
            let tls = JobTls::generate(&spec.name)?;
            if let Some(token_file) = &cluster.token_file {
                tls.write_ca(&ca_path(token_file))?;
            }
            Some(tls)
        }
        (_, false) => None,
    };
    // Beyond one host the working directory goes to the others with the job.
    let bundle = match cluster.multi_host() {
        true => {
            // Never the job's secrets, nor any run's outputs (this one's, earlier ones' moved aside).
            let ca = cluster.token_file.as_deref().map(ca_path);
            let tls = cluster.tls.iter().flat_map(|t| [t.cert.as_path(), t.key.as_path(), t.ca.as_path()]);
            let run_dir = spec.run_path.parent().unwrap_or(&spec.run_path);
            let skip: Vec<&Path> = [Some(run_dir), cluster.token_file.as_deref(), ca.as_deref()]
                .into_iter()
                .flatten()
                .chain(tls)
                .collect();
            Some(crate::working_dir::pack(&spec.working_dir, &skip, cluster.max_working_dir_mb)?)
        }
        false => None,
    };
    Ok(Prepared { token, tls, bundle })
}

/// `srun` starting the agents of the allocation's other nodes; its output goes to
/// `logs/agents.log`. Dropping the child kills it (the agents leave with the job anyway).
pub(super) fn start_slurm_agents(
    alloc: &crate::slurm::Allocation,
    job: &JobContext,
    join: std::net::SocketAddr,
    token_file: &Path,
    spec: &JobSpec,
) -> Result<tokio::process::Child, LaunchError> {
    let exe = std::env::current_exe().map_err(LaunchError::Coordinator)?;
    let log_path = job.run_dir.join("logs").join("agents.log");
    let _ = std::fs::create_dir_all(job.run_dir.join("logs"));
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| LaunchError::Spawn(SpawnError::Log { path: log_path.clone(), source }))?;
    let err =
        log.try_clone().map_err(|source| LaunchError::Spawn(SpawnError::Log { path: log_path.clone(), source }))?;
    let mut cmd = crate::slurm::agents_command(alloc, &exe, join, token_file, spec.rendezvous_timeout.as_secs_f64());
    cmd.stdin(std::process::Stdio::null()).stdout(log).stderr(err);
    job.println(&format!(
        "Slurm job {}: starting an agent on each of {} with srun (their output: {})",
        alloc.job_id,
        alloc.nodes[1..].join(", "),
        log_path.display()
    ));
    tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| LaunchError::Slurm(crate::slurm::SlurmError::Run { program: "srun".into(), source }))
}
