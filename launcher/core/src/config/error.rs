use std::path::PathBuf;

/// A config that cannot be used, with the file and the dotted key path at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {key}: {message}", path.display())]
    Invalid { path: PathBuf, key: String, message: String },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("--set {spec}: {message}")]
    Override { spec: String, message: String },
}
