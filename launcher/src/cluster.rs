//! What a job over several hosts needs besides what one host does: the job token in a file the
//! agents read too, and a certificate authority made for the job, whose certificate proves the
//! coordinator to every process (its control plane crosses the network, so it is TLS).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::job_client::TLS_SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "{} may be read by other users (mode {mode:o}); it is a secret: run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{} holds no job token: it should hold one line of 16 to 256 of A-Z a-z 0-9 - _", path.display())]
    BadToken { path: PathBuf },
    #[error("cannot make the job's TLS certificates: {0}")]
    Tls(#[from] rcgen::Error),
    #[error("{} holds no {what} in PEM form (a `-----BEGIN ... {marker}-----` block)", path.display())]
    NotPem { path: PathBuf, what: &'static str, marker: &'static str },
}

/// The job token in `path`, checked: only its owner may read it. `Ok(None)` when there is no file.
pub fn read_token(path: &Path) -> Result<Option<String>, ClusterError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ClusterError::Read { path: path.into(), source }),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ClusterError::Exposed { path: path.into(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read { path: path.into(), source })?;
    let token = text.trim();
    let valid =
        (16..=256).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(ClusterError::BadToken { path: path.into() });
    }
    Ok(Some(token.to_string()))
}

/// The job token in `path`, or `fresh` written there (mode 0600, created exclusively, so two
/// launches racing for the file agree on the one that won).
pub fn token_from_file(path: &Path, fresh: &str) -> Result<String, ClusterError> {
    if let Some(token) = read_token(path)? {
        return Ok(token);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ClusterError::Write { path: dir.into(), source })?;
    }
    match std::fs::File::options().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut file) => {
            file.write_all(format!("{fresh}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|source| ClusterError::Write { path: path.into(), source })?;
            Ok(fresh.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_token(path)?.ok_or_else(|| ClusterError::BadToken { path: path.into() })
        }
        Err(source) => Err(ClusterError::Write { path: path.into(), source }),
    }
}

/// Where the job CA's certificate is written for the agents: beside the token file.
pub fn ca_path(token_file: &Path) -> PathBuf {
    let mut name = token_file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".ca.pem");
    token_file.with_file_name(name)
}

/// A job's certificates: its CA's (public, for every client) and the coordinator's with its key
/// (kept in memory only).
#[derive(Clone)]
pub struct JobTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for JobTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTls").field("ca_pem", &self.ca_pem).finish_non_exhaustive()
    }
}

impl JobTls {
    /// A new CA, used once: it signs the coordinator's certificate for [`TLS_SERVER_NAME`] and
    /// its key is dropped. Both are valid from the start of last year to the end of next year.
    pub fn generate(job: &str) -> Result<Self, ClusterError> {
        let year = 1970 + (crate::contract::unix_now() / 31_556_952.0) as i32;
        let (from, until) = (rcgen::date_time_ymd(year - 1, 1, 1), rcgen::date_time_ymd(year + 2, 1, 1));
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        (ca.not_before, ca.not_after) = (from, until);
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cn: String = job.chars().filter(|c| c.is_ascii_graphic()).take(48).collect();
        ca.distinguished_name.push(DnType::CommonName, format!("rtrain job CA {cn}"));
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec![TLS_SERVER_NAME.to_string()])?;
        (server.not_before, server.not_after) = (from, until);
        server.distinguished_name.push(DnType::CommonName, TLS_SERVER_NAME);
        let cert = server.signed_by(&key, &issuer)?;
        Ok(Self { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// The user's own files; the key must be readable by its owner only.
    pub fn from_files(files: &crate::config::TlsFiles) -> Result<Self, ClusterError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ClusterError::Read { path: path.into(), source })
        };
        let mode = std::fs::metadata(&files.key)
            .map_err(|source| ClusterError::Read { path: files.key.clone(), source })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(ClusterError::Exposed { path: files.key.clone(), mode });
        }
        let pem = |path: &Path, what: &'static str, marker: &'static str| {
            let text = read(path)?;
            match text.contains("-----BEGIN ") && text.contains(&format!("{marker}-----")) {
                true => Ok(text),
                false => Err(ClusterError::NotPem { path: path.into(), what, marker }),
            }
        };
        Ok(Self {
            ca_pem: pem(&files.ca, "CA certificate (cluster.tls_ca)", "CERTIFICATE")?,
            cert_pem: pem(&files.cert, "certificate (cluster.tls_cert)", "CERTIFICATE")?,
            key_pem: pem(&files.key, "private key (cluster.tls_key)", "PRIVATE KEY")?,
        })
    }

    /// Writes the CA's certificate to `path` (readable by the owner only, like the token).
    pub fn write_ca(&self, path: &Path) -> Result<(), ClusterError> {
        let write = |path: &Path| -> std::io::Result<()> {
            let tmp = path.with_extension("pem.tmp");
            let mut file = std::fs::File::options().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            file.write_all(self.ca_pem.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write(path).map_err(|source| ClusterError::Write { path: path.into(), source })
    }
}

/// The address of this host that faces `peer`: the source address the kernel picks for a route
/// to it (a UDP socket is connected to it; nothing is sent).
pub fn address_towards(peer: std::net::SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let any: std::net::SocketAddr = if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(peer)?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_written_once_with_mode_600_and_refused_when_others_may_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/job.token");
        assert_eq!(token_from_file(&path, "0123456789abcdef0123").unwrap(), "0123456789abcdef0123");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // The file wins over a new token.
        assert_eq!(token_from_file(&path, "ffffffffffffffffffff").unwrap(), "0123456789abcdef0123");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = token_from_file(&path, "x").unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(read_token(&path), Err(ClusterError::BadToken { .. })));
        assert_eq!(read_token(&dir.path().join("none")).unwrap(), None);
    }

    #[test]
    fn your_own_tls_files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let tls = JobTls::generate("x").unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let files = crate::config::TlsFiles {
            cert: write("tls.crt", &tls.cert_pem, 0o644),
            key: write("tls.key", &tls.key_pem, 0o600),
            ca: write("ca.crt", &tls.ca_pem, 0o644),
        };
        assert_eq!(JobTls::from_files(&files).unwrap().ca_pem, tls.ca_pem);
        let garbage = crate::config::TlsFiles { cert: write("bad.crt", "garbage", 0o644), ..files.clone() };
        let e = JobTls::from_files(&garbage).unwrap_err().to_string();
        assert!(e.contains("bad.crt") && e.contains("cluster.tls_cert"), "{e}");
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(JobTls::from_files(&files).unwrap_err().to_string().contains("chmod 600"));
    }

    #[test]
    fn the_ca_sits_beside_the_token() {
        assert_eq!(ca_path(Path::new("/a/b/job.token")), Path::new("/a/b/job.token.ca.pem"));
    }

    #[test]
    fn the_job_ca_issues_the_coordinator_certificate() {
        let tls = JobTls::generate("demo").unwrap();
        assert!(tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(tls.key_pem.contains("PRIVATE KEY"));
        assert_ne!(tls.ca_pem, tls.cert_pem);
        // The key never shows in debug output.
        assert!(!format!("{tls:?}").contains("PRIVATE"));
    }
}
