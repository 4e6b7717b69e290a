//! `[rl.reward]`: how rollout samples are scored.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The TOML table as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    pub kind: String,
    pub field: Option<String>,
    pub tolerance: Option<f64>,
}

/// How a sample is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardSpec {
    Exact { field: String },
    Numeric { field: String, tolerance: f64 },
    Regex { pattern: String },
    Http { url: String, timeout: Duration, retries: u32 },
    Model { path: PathBuf, batch: usize },
}

/// Checks the table; errors carry the dotted key.
pub fn resolve_reward(section: &RewardSection) -> Result<RewardSpec, (String, String)> {
    let field = section.field.clone().unwrap_or_else(|| "answer".into());
    match section.kind.as_str() {
        "exact" => Ok(RewardSpec::Exact { field }),
        "numeric" => Ok(RewardSpec::Numeric { field, tolerance: section.tolerance.unwrap_or(1e-6) }),
        other => Err(("rl.reward.kind".into(), format!("`{other}` is not a reward; use \"exact\" or \"numeric\""))),
    }
}
