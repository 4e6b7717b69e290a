//! Job configuration: the TOML schema ([`JobConfig`]), `--set` overrides, and the resolved
//! [`JobSpec`]. Errors name the file, the dotted key path and what would be valid.

mod choice;
mod error;
mod overrides;
pub mod preference;
mod resolve;
pub mod reward;
pub mod rl;
mod schema;

use std::path::{Path, PathBuf};

pub use error::ConfigError;
pub use overrides::apply_override;
pub use resolve::{
    BUILTIN_PROGRAMS, BackendKind, CheckpointSpec, ClusterSpec, DEFAULT_EVAL_FRACTION, DataSpec, DeviceKind, EvalSpec,
    FaultSpec, HeldOut, JobSpec, MAX_HOSTS, ModelSpec, OptimSpec, Precision, RoleProgram, RoleSpec, TRAINING_ROLE,
    TlsFiles, TrainerKind, resolve,
};
pub use reward::{RewardKind, RewardSection, RewardSpec, resolve_reward};
pub use schema::{
    BackendChoice, CheckpointSection, ClusterSection, DashboardSection, DataSection, EchoChoice, EvalSection,
    FaultSection, JobConfig, JobSection, MetricChoice, MetricsSection, ModelInit, ModelKind, ModelSection, OrderChoice,
    RendezvousSection, RestartMode, RoleSection, TrainSection, TrainerChoice, Workers,
};

/// A config file read, overridden, typed and resolved.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: JobConfig,
    pub spec: JobSpec,
}

/// Reads `path`, applies `overrides` (`key.path=value`) in order, and resolves the result.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    for spec in overrides {
        apply_override(&mut table, spec)?;
    }
    let mut config = from_table(table, path)?;
    anchor_paths(&mut config, path)?;
    let spec = resolve(&config, path)?;
    Ok(LoadedConfig { path: path.to_path_buf(), config, spec })
}

/// Makes `job.working_dir` absolute (the config file's folder, or a folder relative to it) and
/// every relative path of the config relative to it, so a config runs the same from any
/// directory, and the copy a run keeps (which its workers read) names the same files.
pub fn anchor_paths(config: &mut JobConfig, path: &Path) -> Result<(), ConfigError> {
    let invalid =
        |key: &str, message: String| ConfigError::Invalid { path: path.to_path_buf(), key: key.to_string(), message };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let folder = std::path::absolute(&folder).map_err(|e| invalid("job.working_dir", e.to_string()))?;
    let working_dir = folder.join(&config.job.working_dir);
    if !working_dir.is_dir() {
        return Err(invalid(
            "job.working_dir",
            format!("{} is not a directory (it is relative to the config file's folder)", working_dir.display()),
        ));
    }
    let working_dir = working_dir.canonicalize().map_err(|e| invalid("job.working_dir", e.to_string()))?;
    let anchor = |p: &mut String| {
        if !p.is_empty() && Path::new(p.as_str()).is_relative() {
            *p = working_dir.join(p.as_str()).display().to_string();
        }
    };
    anchor(&mut config.job.run_dir);
    anchor(&mut config.model.path);
    if config.data.source != "synthetic" {
        anchor(&mut config.data.source);
    }
    anchor(&mut config.data.eval_path);
    for path in [
        &mut config.cluster.token_file,
        &mut config.cluster.tls_cert,
        &mut config.cluster.tls_key,
        &mut config.cluster.tls_ca,
    ] {
        anchor(path);
    }
    if let Some(rl) = config.rl.as_mut() {
        anchor(&mut rl.eval_path);
        if let Some(path) = rl.reward.as_mut().and_then(|r| r.path.as_mut()) {
            anchor(path);
        }
    }
    config.job.working_dir = working_dir.display().to_string();
    Ok(())
}

/// Types a parsed table, reporting the dotted path of the first offending key.
pub fn from_table(table: toml::Table, path: &Path) -> Result<JobConfig, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().to_string();
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key: if key == "." { "(top level)".into() } else { key },
            message: message.trim_end().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, overrides: &[&str]) -> Result<LoadedConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load(&path, &overrides)
    }

    #[test]
    fn derived_numbers_are_computed_once() {
        let c = load_str("[train]\nworkers = 2\nmicro_batch = 4\ngrad_accum = 3\n[model]\nn_ctx = 64", &[]).unwrap();
        assert_eq!(c.spec.global_batch, 24);
        assert_eq!(c.spec.tokens_per_step, 24 * 64);
        assert_eq!(c.spec.backend, BackendKind::Shm { or_tcp: true });
        // Relative to the config file's folder, made absolute.
        assert!(c.spec.run_path.is_absolute() && c.spec.run_path.ends_with("runs/run"), "{:?}", c.spec.run_path);
        assert_eq!(c.spec.run_path.parent().and_then(Path::parent), Some(c.spec.working_dir.as_path()));
    }

    #[test]
    fn overrides_win_over_the_file() {
        let c = load_str("[train]\nworkers = 2", &["train.workers=4", "job.name=x"]).unwrap();
        assert_eq!(c.spec.workers, 4);
        assert_eq!(c.spec.name, "x");
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let e = load_str("[train]\nwokers = 2", &[]).unwrap_err().to_string();
        assert!(e.contains("job.toml: train") && e.contains("`wokers`") && e.contains("`workers`"), "{e}");
        let e = load_str("[train]\nworkers = \"two\"", &[]).unwrap_err().to_string();
        assert!(e.contains("train.workers") && e.contains("an integer, or a table"), "{e}");
        let e = load_str("[train]\nsteps = \"two\"", &[]).unwrap_err().to_string();
        assert!(e.contains("train.steps") && e.contains("invalid type"), "{e}");
        let e = load_str("[train]\nworkers = 0", &[]).unwrap_err().to_string();
        assert!(e.contains("train.workers: must be at least 1"), "{e}");
        let e = load_str("[train]\ndevice = \"tpu\"", &[]).unwrap_err().to_string();
        assert!(e.contains("train.device") && e.contains("\"cuda\""), "{e}");
        let e = load_str("[train]\nprecision = \"fp16\"", &[]).unwrap_err().to_string();
        assert!(e.contains("train.precision") && e.contains("\"bf16\""), "{e}");
        let e = load_str("", &["train.tf32=1"]).unwrap_err().to_string();
        assert!(e.contains("train.tf32"), "{e}");
        let spec = load_str("[train]\nprecision = \"bf16\"\ntf32 = false", &[]).unwrap().spec;
        assert_eq!((spec.precision, spec.tf32), (Precision::Bf16, false));
        let e = load_str("[train]\nbackend = \"nccl\"", &[]).unwrap_err().to_string();
        assert!(e.contains("train.backend") && e.contains("\"shm\", \"tcp\""), "{e}");
        let e = load_str("[model]\nn_head = 3", &[]).unwrap_err().to_string();
        assert!(e.contains("model.n_embd"), "{e}");
        let e = load_str("[train\n", &[]).unwrap_err().to_string();
        assert!(e.contains("job.toml"), "{e}");
        let e = load_str("", &["train.workers=abc"]).unwrap_err().to_string();
        assert!(e.contains("train.workers"), "{e}");
    }

    #[test]
    fn roles_resolve_beside_the_trainer() {
        let text = "[train]\nworkers = 2\ncpus_per_worker = 0.75\n\
                    [roles.actor]\nsize = { min = 1, max = 3 }\nentrypoint = [\"python3\", \"a.py\"]\ncpus_per_worker = 0.25\n";
        let c = load_str(text, &[]).unwrap();
        let names: Vec<&str> = c.spec.roles.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["trainer", "actor"]);
        let actor = &c.spec.roles[1];
        assert_eq!((actor.min_size, actor.size, actor.restart), (1, 3, RestartMode::Alone));
        assert_eq!((actor.cpus_per_worker, actor.max_restarts), (0.25, 10));
        assert_eq!(c.spec.roles[0].cpus_per_worker, 0.75);
        assert_eq!(c.spec.training_role().map(|r| r.size), Some(2));

        // Roles only: no training role.
        let c = load_str("[roles.svc]\nsize = 1\nentrypoint = [\"true\"]\nrestart = \"gang\"", &[]).unwrap();
        assert!(c.spec.training_role().is_none());
        assert_eq!(c.spec.roles[0].restart, RestartMode::Gang);
        // Neither: the default trainer.
        assert_eq!(load_str("", &[]).unwrap().spec.roles.len(), 1);
    }

    #[test]
    fn bad_roles_name_their_key() {
        let role = |body: &str| load_str(&format!("[roles.actor]\n{body}"), &[]).unwrap_err().to_string();
        let ep = "entrypoint = [\"x\"]\n";
        let e = role(&format!("size = 0\n{ep}"));
        assert!(e.contains("roles.actor.size: must be at least 1"), "{e}");
        let e = role(&format!("size = {{ min = 3, max = 2 }}\n{ep}"));
        assert!(e.contains("roles.actor.size") && e.contains("min <= max"), "{e}");
        let e = role(&format!("size = 1\n{ep}colour = 1"));
        assert!(e.contains("roles.actor") && e.contains("`colour`"), "{e}");
        let e = role(&format!("size = 1\n{ep}restart = \"never\""));
        assert!(e.contains("roles.actor.restart") && e.contains("alone"), "{e}");
        let e = role("size = 1\nentrypoint = []");
        assert!(e.contains("roles.actor.entrypoint"), "{e}");
        let e = role(&format!("size = 1\n{ep}cpus_per_worker = 0"));
        assert!(e.contains("roles.actor.cpus_per_worker"), "{e}");
        let e = load_str("[roles.trainer]\nsize = 1\nentrypoint = [\"x\"]", &[]).unwrap_err().to_string();
        assert!(e.contains("roles.trainer") && e.contains("[train]"), "{e}");
        let e = load_str("[roles.\"a b\"]\nsize = 1\nentrypoint = [\"x\"]", &[]).unwrap_err().to_string();
        assert!(e.contains("role name"), "{e}");
    }

    #[test]
    fn huge_durations_and_budgets_are_refused_not_wrapped() {
        for key in [
            "rendezvous.timeout_s",
            "rendezvous.heartbeat_s",
            "fault.heartbeat_timeout_s",
            "fault.backoff_s",
            "fault.max_backoff_s",
            "train.collective_timeout_s",
        ] {
            for v in ["1e300", "1e19", "nan", "inf", "-1"] {
                let e = load_str("", &[&format!("{key}={v}")]).unwrap_err().to_string();
                assert!(e.contains(key) && e.contains("a week"), "{key}={v}: {e}");
            }
        }
        let e = load_str("", &["fault.max_restarts=100000000000"]).unwrap_err().to_string();
        assert!(e.contains("fault.max_restarts: must be at most 1000000"), "{e}");
        let e = load_str("[roles.a]\nsize = 1\nentrypoint = [\"x\"]\nbackoff_s = 1e300", &[]).unwrap_err().to_string();
        assert!(e.contains("roles.a.backoff_s"), "{e}");
        let e = load_str("", &["train.workers={min=1,max=2,foo=3}"]).unwrap_err().to_string();
        assert!(e.contains("train.workers") && e.contains("no other keys"), "{e}");
        assert!(load_str("", &["fault.backoff_s=0", "rendezvous.timeout_s=604800"]).is_ok());
    }

    #[test]
    fn cluster_settings_are_checked_and_name_their_key() {
        let refused = |overrides: &[&str], key: &str, says: &str| {
            let e = load_str("", overrides).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{overrides:?}: {e}");
        };
        refused(&["cluster.hosts=0"], "cluster.hosts", "between 1 and 1024");
        refused(&["cluster.hosts=5000"], "cluster.hosts", "between 1 and 1024");
        refused(&["cluster.hosts=2"], "cluster.bind", "10.0.0.1:29400");
        refused(&["cluster.hosts=2", "cluster.bind=\"node1:29400\""], "cluster.bind", "not ADDRESS:PORT");
        refused(&["cluster.hosts=2", "cluster.bind=\"10.0.0.1\""], "cluster.bind", "not ADDRESS:PORT");
        refused(&["cluster.hosts=2", "cluster.bind=\"10.0.0.1:1\""], "cluster.token_file", "agents read");
        refused(&["cluster.tls_cert=\"a.pem\""], "cluster.tls_key", "all three");
        refused(&["cluster.hosts=2", "cluster.bind=\"0.0.0.0:29400\""], "cluster.bind", "can reach");
        refused(&["cluster.max_working_dir_mb=0"], "cluster.max_working_dir_mb", "at least 1");
        let ok =
            load_str("", &["cluster.hosts=2", "cluster.bind=\"[::1]:29400\"", "cluster.token_file=\"t\""]).unwrap();
        assert_eq!(ok.spec.cluster.hosts, 2);
        assert!(ok.spec.cluster.token_file.unwrap().is_absolute(), "anchored to the working directory");
        let e = load_str("[roles.a]\nsize = 1\nentrypoint = [\"x\"]\n[cluster]\nhosts = 2\nbind = \"10.0.0.1:1\"\ntoken_file = \"t\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.hosts") && e.contains("training role"), "{e}");
        // One host: loopback and a free port, no token file needed.
        assert!(load_str("", &[]).unwrap().spec.cluster.bind.ip().is_loopback());
    }

    #[test]
    fn missing_file_is_reported_with_its_path() {
        let e = load(Path::new("/nonexistent/job.toml"), &[]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/job.toml") && e.contains("cannot read"), "{e}");
    }
}
