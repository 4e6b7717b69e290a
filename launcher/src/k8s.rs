//! Kubernetes: `rtrain k8s manifest` prints the objects that run a job over N pods, and
//! `rtrain k8s pod` is what each pod runs. The job is an Indexed Job whose pods find each other
//! through a headless Service (pod 0, `<name>-0.<name>`, is the driver; the others run agents);
//! the job token and the TLS files are a Secret, the config a ConfigMap. The run directory should
//! be a volume every pod mounts (`--run-claim`, a ReadWriteMany claim): restarts resume from the
//! checkpoints there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::batch::v1::{Job, JobSpec as K8sJobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, ResourceRequirements, Secret, SecretVolumeSource,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::cluster::JobTls;
use crate::config::JobSpec;

/// Where a pod finds what the manifest gives it.
pub const SECRETS_DIR: &str = "/var/run/rtrain";
pub const CONFIG_DIR: &str = "/etc/rtrain";
pub const RUNS_DIR: &str = "/runs";
/// The files of the Secret.
pub const TOKEN_FILE: &str = "token";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";
/// The config's file in the ConfigMap.
pub const CONFIG_FILE: &str = "job.toml";
const LABEL: &str = "rtrain.dev/job";

#[derive(Debug, Clone)]
pub struct ManifestOptions {
    pub nodes: usize,
    pub image: String,
    pub namespace: Option<String>,
    /// The coordinator's port on pod 0.
    pub port: u16,
    /// A PersistentVolumeClaim (ReadWriteMany) for the run directory; none: an emptyDir per pod.
    pub run_claim: Option<String>,
    /// Where the job's files are in the image (its `job.working_dir` there).
    pub workdir: String,
    /// The `rtrain` executable in the image.
    pub rtrain: String,
    /// `--set KEY=VALUE` overrides every pod applies to the config.
    pub overrides: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tls(#[from] crate::cluster::ClusterError),
    #[error("cannot write the manifest as YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

/// The objects of a job, in the order to apply them.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub secret: Secret,
    pub config: ConfigMap,
    pub service: Service,
    pub job: Job,
}

impl Manifest {
    /// As YAML documents separated by `---`, as `kubectl apply -f` takes them.
    pub fn to_yaml(&self) -> Result<String, K8sError> {
        Ok([
            serde_yaml_ng::to_string(&self.secret)?,
            serde_yaml_ng::to_string(&self.config)?,
            serde_yaml_ng::to_string(&self.service)?,
            serde_yaml_ng::to_string(&self.job)?,
        ]
        .join("---\n"))
    }

    /// Reads back what [`Manifest::to_yaml`] wrote.
    pub fn from_yaml(text: &str) -> Result<Self, K8sError> {
        let docs: Vec<&str> = text.split("\n---\n").collect();
        let [secret, config, service, job] = docs.as_slice() else {
            return Err(K8sError::Invalid(format!("expected 4 documents, found {}", docs.len())));
        };
        Ok(Self {
            secret: serde_yaml_ng::from_str(secret)?,
            config: serde_yaml_ng::from_str(config)?,
            service: serde_yaml_ng::from_str(service)?,
            job: serde_yaml_ng::from_str(job)?,
        })
    }
}

/// A name Kubernetes takes for Services and Jobs (RFC 1123 label, short enough for pod names).
fn object_name(job: &str) -> Result<String, K8sError> {
    let name: String =
        job.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let name = name.trim_matches('-').to_string();
    // A Service's name starts with a letter.
    let name = if name.starts_with(|c: char| c.is_ascii_digit()) { format!("rt-{name}") } else { name };
    if name.is_empty() || name.len() > 50 {
        return Err(K8sError::Invalid(format!(
            "job.name `{job}` does not make a Kubernetes name (1 to 50 letters, digits or `-`)"
        )));
    }
    Ok(name)
}

/// The manifest of `spec` (its config file's text `config_text`), with a new job token and TLS
/// files made for it.
pub fn manifest(spec: &JobSpec, config_text: &str, opts: &ManifestOptions) -> Result<Manifest, K8sError> {
    if opts.nodes == 0 || opts.nodes as u64 > crate::config::MAX_HOSTS {
        return Err(K8sError::Invalid(format!("--nodes must be between 1 and {}", crate::config::MAX_HOSTS)));
    }
    if opts.image.trim().is_empty() || opts.image.chars().any(char::is_whitespace) {
        return Err(K8sError::Invalid(format!("--image `{}` is not an image reference", opts.image)));
    }
    if let Some(ns) = &opts.namespace {
        let label = !ns.is_empty()
            && ns.len() <= 63
            && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if !label {
            return Err(K8sError::Invalid(format!(
                "--namespace `{ns}` is not a Kubernetes namespace name (lower-case letters, digits and `-`)"
            )));
        }
    }
    if spec.training_role().is_none() {
        return Err(K8sError::Invalid("the job has no training role to spread over pods".into()));
    }
    let name = object_name(&spec.name)?;
    let meta = |n: String| ObjectMeta {
        name: Some(n),
        namespace: opts.namespace.clone(),
        labels: Some(BTreeMap::from([(LABEL.to_string(), name.clone())])),
        ..Default::default()
    };
    let tls = JobTls::generate(&spec.name)?;
    let secrets = format!("{name}-secrets");
    let secret = Secret {
        metadata: meta(secrets.clone()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            (TOKEN_FILE.to_string(), crate::worker_env::job_token()),
            (CERT_FILE.to_string(), tls.cert_pem),
            (KEY_FILE.to_string(), tls.key_pem),
            (CA_FILE.to_string(), tls.ca_pem),
        ])),
        ..Default::default()
    };
    let config_map = format!("{name}-config");
    let config = ConfigMap {
        metadata: meta(config_map.clone()),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), config_text.to_string())])),
        ..Default::default()
    };
    let service = Service {
        metadata: meta(name.clone()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([(LABEL.to_string(), name.clone())])),
            // Pods are found by name before any is ready: the driver waits for its agents.
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![ServicePort {
                name: Some("coordinator".into()),
                port: i32::from(opts.port),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };

    // Each pod holds its share of the gang (the driver's pod the largest).
    let trainer = spec.training_role().map(|r| (r.size, r.cpus_per_worker, r.gpus_per_worker)).unwrap_or((1, 1.0, 0));
    let per_pod = trainer.0.div_ceil(opts.nodes);
    let millicores = (per_pod as f64 * trainer.1 * 1000.0).ceil().max(100.0) as u64;
    let mut requests = BTreeMap::from([("cpu".to_string(), Quantity(format!("{millicores}m")))]);
    let mut limits = BTreeMap::new();
    if trainer.2 > 0 {
        let gpus = Quantity((per_pod * trainer.2).to_string());
        requests.insert("nvidia.com/gpu".into(), gpus.clone());
        limits.insert("nvidia.com/gpu".into(), gpus);
    }
    let command: Vec<String> = [
        opts.rtrain.clone(),
        "k8s".into(),
        "pod".into(),
        format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        "--hosts".into(),
        opts.nodes.to_string(),
        "--driver".into(),
        format!("{name}-0.{name}:{}", opts.port),
        "--secrets".into(),
        SECRETS_DIR.into(),
        "--set".into(),
        format!("job.working_dir={}", opts.workdir),
        "--set".into(),
        format!("job.run_dir={RUNS_DIR}"),
    ]
    .into_iter()
    .chain(opts.overrides.iter().flat_map(|o| ["--set".to_string(), o.clone()]))
    .collect();
    let runs_volume = match &opts.run_claim {
        Some(claim) => Volume {
            name: "runs".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        None => Volume { name: "runs".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
    };
    let pod = PodSpec {
        subdomain: Some(name.clone()),
        // A pod whose rtrain fails is restarted in place (same name and address): an agent
        // rejoins, a driver resumes from the run's checkpoints.
        restart_policy: Some("OnFailure".into()),
        containers: vec![Container {
            name: "rtrain".into(),
            image: Some(opts.image.clone()),
            command: Some(command),
            working_dir: Some(opts.workdir.clone()),
            env: Some(vec![EnvVar {
                name: "POD_IP".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector { field_path: "status.podIP".into(), ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            resources: Some(ResourceRequirements {
                requests: Some(requests),
                limits: (!limits.is_empty()).then_some(limits),
                ..Default::default()
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "secrets".into(),
                    mount_path: SECRETS_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount {
                    name: "config".into(),
                    mount_path: CONFIG_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount { name: "runs".into(), mount_path: RUNS_DIR.into(), ..Default::default() },
            ]),
            ..Default::default()
        }],
        volumes: Some(vec![
            Volume {
                name: "secrets".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secrets),
                    // Owner-only, as rtrain requires of its token and key files.
                    default_mode: Some(0o400),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource { name: config_map, ..Default::default() }),
                ..Default::default()
            },
            runs_volume,
        ]),
        ..Default::default()
    };
    let job = Job {
        metadata: meta(name.clone()),
        spec: Some(K8sJobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(opts.nodes as i32),
            parallelism: Some(opts.nodes as i32),
            // Restarts of failed pods, over the whole Job, before it is failed.
            backoff_limit: Some(6),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(BTreeMap::from([(LABEL.to_string(), name.clone())])),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Manifest { secret, config, service, job })
}

/// What one pod of the Indexed Job runs, from the environment Kubernetes gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum PodRole {
    /// Pod 0: `rtrain launch` with these overrides added.
    Driver { overrides: Vec<String> },
    /// The others: an agent.
    Agent(crate::host_agent::AgentOptions),
}

/// The role of the pod with index `index` (`JOB_COMPLETION_INDEX`) and address `pod_ip`
/// (`POD_IP`), of a job over `hosts` pods whose driver is `driver` (`HOST:PORT`), with the
/// Secret's files in `secrets`.
pub fn pod_role(
    index: usize,
    pod_ip: std::net::IpAddr,
    hosts: usize,
    driver: &str,
    secrets: &Path,
    name: String,
) -> Result<PodRole, K8sError> {
    let port = driver
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| K8sError::Invalid(format!("--driver {driver}: expected HOST:PORT")))?;
    let file = |f: &str| -> PathBuf { secrets.join(f) };
    if index >= hosts {
        return Err(K8sError::Invalid(format!("JOB_COMPLETION_INDEX {index} is not below --hosts {hosts}")));
    }
    if index == 0 {
        let ip = match pod_ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        let set = |k: &str, v: String| format!("cluster.{k}={}", toml_string(&v));
        return Ok(PodRole::Driver {
            overrides: vec![
                format!("cluster.hosts={hosts}"),
                set("bind", format!("{ip}:{port}")),
                set("token_file", file(TOKEN_FILE).display().to_string()),
                set("tls_cert", file(CERT_FILE).display().to_string()),
                set("tls_key", file(KEY_FILE).display().to_string()),
                set("tls_ca", file(CA_FILE).display().to_string()),
            ],
        });
    }
    Ok(PodRole::Agent(crate::host_agent::AgentOptions {
        join: driver.to_string(),
        token_file: file(TOKEN_FILE),
        ca_file: Some(file(CA_FILE)),
        name: Some(name),
        address: Some(pod_ip),
        // The driver's pod may be scheduled long after this one.
        wait: std::time::Duration::from_secs(600),
        cache_dir: crate::host_agent::default_cache_dir(),
    }))
}

/// `text` as a TOML string (for `--set key=VALUE`).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(workers: usize) -> JobSpec {
        let text = format!("[job]\nname = \"Demo_Job\"\n[train]\nworkers = {workers}\ncpus_per_worker = 1.5\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        crate::config::load(&path, &[]).unwrap().spec
    }

    fn opts() -> ManifestOptions {
        ManifestOptions {
            nodes: 2,
            image: "registry.example/rtrain:1".into(),
            namespace: Some("ml".into()),
            port: 29400,
            run_claim: Some("runs".into()),
            workdir: "/workspace".into(),
            rtrain: "rtrain".into(),
            overrides: vec!["train.steps=10".into()],
        }
    }

    #[test]
    fn the_manifest_round_trips_through_yaml() {
        let m = manifest(&spec(4), "[job]\nname = \"Demo_Job\"\n", &opts()).unwrap();
        let yaml = m.to_yaml().unwrap();
        assert_eq!(Manifest::from_yaml(&yaml).unwrap(), m);
        for kind in ["kind: Secret", "kind: ConfigMap", "kind: Service", "kind: Job", "apiVersion: batch/v1"] {
            assert!(yaml.contains(kind), "{kind} missing:\n{yaml}");
        }
    }

    #[test]
    fn an_indexed_job_over_a_headless_service_with_each_pods_share_of_the_gang() {
        let m = manifest(&spec(4), "", &opts()).unwrap();
        let job = m.job.spec.as_ref().unwrap();
        assert_eq!(job.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((job.completions, job.parallelism), (Some(2), Some(2)));
        let pod = job.template.spec.as_ref().unwrap();
        assert_eq!(pod.subdomain.as_deref(), Some("demo-job"));
        assert_eq!(m.service.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"));
        let c = &pod.containers[0];
        // Two workers of 1.5 cores on each pod.
        assert_eq!(c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"], Quantity("3000m".into()));
        let command = c.command.as_ref().unwrap().join(" ");
        assert!(command.contains("--driver demo-job-0.demo-job:29400"), "{command}");
        let secret = m.secret.string_data.as_ref().unwrap();
        assert_eq!(secret[TOKEN_FILE].len(), 32);
        assert!(secret[CA_FILE].starts_with("-----BEGIN CERTIFICATE-----"));
        let volumes = pod.volumes.as_ref().unwrap();
        assert_eq!(volumes[0].secret.as_ref().unwrap().default_mode, Some(0o400));
        assert_eq!(volumes[2].persistent_volume_claim.as_ref().unwrap().claim_name, "runs");
    }

    #[test]
    fn names_images_and_namespaces_are_checked() {
        let mut text_spec = spec(2);
        text_spec.name = "123_Job".into();
        let m = manifest(&text_spec, "", &opts()).unwrap();
        assert_eq!(m.service.metadata.name.as_deref(), Some("rt-123-job"));
        let bad_image = ManifestOptions { image: " ".into(), ..opts() };
        assert!(manifest(&spec(2), "", &bad_image).unwrap_err().to_string().contains("--image"));
        let bad_ns = ManifestOptions { namespace: Some("Bad NS".into()), ..opts() };
        assert!(manifest(&spec(2), "", &bad_ns).unwrap_err().to_string().contains("--namespace"));
    }

    #[test]
    fn pod_zero_drives_and_the_others_join_it() {
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let secrets = Path::new(SECRETS_DIR);
        let PodRole::Driver { overrides } = pod_role(0, ip, 3, "j-0.j:29400", secrets, "j-0".into()).unwrap() else {
            panic!("pod 0 drives")
        };
        assert!(overrides.contains(&"cluster.bind=\"10.1.2.3:29400\"".to_string()), "{overrides:?}");
        assert!(overrides.contains(&"cluster.hosts=3".to_string()));
        let PodRole::Agent(agent) = pod_role(2, ip, 3, "j-0.j:29400", secrets, "j-2".into()).unwrap() else {
            panic!("pod 2 is an agent")
        };
        assert_eq!((agent.join.as_str(), agent.address), ("j-0.j:29400", Some(ip)));
        assert!(pod_role(3, ip, 3, "j-0.j:29400", secrets, "x".into()).is_err());
        assert!(pod_role(1, ip, 3, "no-port", secrets, "x".into()).is_err());
    }
}
