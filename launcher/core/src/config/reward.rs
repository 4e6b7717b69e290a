//! `[rl.reward]`: how rollout samples are scored. [`RewardSection`] mirrors the TOML table;
//! [`resolve_reward`] checks it against its `kind` and returns the strict [`RewardSpec`].
//!
//! ```toml
//! [rl.reward]
//! kind = "numeric"      # exact | numeric | regex | http | model
//! field = "answer"      # exact, numeric: the record field holding the answer
//! tolerance = 1e-6      # numeric
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::choice::choice;
use super::resolve::seconds;

/// The key path every error names.
const SECTION: &str = "rl.reward";
/// The most retries an HTTP reward may make per request.
const MAX_RETRIES: u64 = 100;
/// The largest scoring batch a reward model takes.
const MAX_MODEL_BATCH: u64 = 1 << 16;

choice!(
    /// `rl.reward.kind`: how a response is scored.
    RewardKind, "a reward kind", {
        Exact = "exact", Numeric = "numeric", Regex = "regex", Http = "http", Model = "model"
    }
);

/// The `[rl.reward]` table as written. Every key but `kind` is optional; which ones a kind takes
/// is checked by [`resolve_reward`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    pub kind: RewardKind,
    /// exact, numeric: the record field holding the reference answer (default `answer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// numeric: the largest absolute difference still correct (default 1e-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// regex: a pattern the response must match somewhere (a format reward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// http: the endpoint, `http://host:port/path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// http: seconds one request may take, connection included (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// http: further attempts after a failed request (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u64>,
    /// model: a Hugging Face sequence-classification model folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// model: responses scored per forward pass (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
}

/// How rollout samples are scored, checked and with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardSpec {
    /// 1 when the trimmed response equals the record's `field` as text.
    Exact { field: String },
    /// 1 when the last number in the response is within `tolerance` of the record's `field` (a
    /// JSON number or a numeric string).
    Numeric { field: String, tolerance: f64 },
    /// 1 when the response matches `pattern` (checked to compile).
    Regex { pattern: String },
    /// A remote scorer: POST JSON, rewards back.
    Http { url: String, timeout: Duration, retries: u32 },
    /// A learned reward model folder, scored `batch` responses at a time.
    Model { path: PathBuf, batch: usize },
}

/// Checks `section` against its kind. Errors are `(dotted key, message)`, e.g.
/// `("rl.reward.tolerance", "must be finite and at least 0, got -1")`.
pub fn resolve_reward(section: &RewardSection) -> Result<RewardSpec, (String, String)> {
    let kind = section.kind;
    let given: [(&str, bool, &[RewardKind]); 8] = [
        ("field", section.field.is_some(), &[RewardKind::Exact, RewardKind::Numeric]),
        ("tolerance", section.tolerance.is_some(), &[RewardKind::Numeric]),
        ("pattern", section.pattern.is_some(), &[RewardKind::Regex]),
        ("url", section.url.is_some(), &[RewardKind::Http]),
        ("timeout_s", section.timeout_s.is_some(), &[RewardKind::Http]),
        ("retries", section.retries.is_some(), &[RewardKind::Http]),
        ("path", section.path.is_some(), &[RewardKind::Model]),
        ("batch", section.batch.is_some(), &[RewardKind::Model]),
    ];
    for (name, present, kinds) in given {
        if present && !kinds.contains(&kind) {
            let owners: Vec<String> = kinds.iter().map(|k| format!("\"{k}\"")).collect();
            return Err((
                key(name),
                format!("not a setting of kind \"{kind}\"; it belongs to kind {}", owners.join(" or ")),
            ));
        }
    }
    Ok(match kind {
        RewardKind::Exact => RewardSpec::Exact { field: field(section)? },
        RewardKind::Numeric => {
            let tolerance = section.tolerance.unwrap_or(1e-6);
            if !(tolerance.is_finite() && tolerance >= 0.0) {
                return Err((key("tolerance"), format!("must be finite and at least 0, got {tolerance}")));
            }
            RewardSpec::Numeric { field: field(section)?, tolerance }
        }
        RewardKind::Regex => {
            let pattern = required(&section.pattern, "pattern", "a regular expression the response must match")?;
            if let Err(e) = regex::Regex::new(pattern) {
                return Err((key("pattern"), format!("not a valid regular expression: {e}")));
            }
            RewardSpec::Regex { pattern: pattern.clone() }
        }
        RewardKind::Http => {
            let url = required(&section.url, "url", "the endpoint, e.g. \"http://127.0.0.1:8000/score\"")?;
            check_http_url(url).map_err(|message| (key("url"), message))?;
            let timeout = seconds(&key("timeout_s"), section.timeout_s.unwrap_or(10.0), false)?;
            let retries = section.retries.unwrap_or(2);
            if retries > MAX_RETRIES {
                return Err((key("retries"), format!("must be at most {MAX_RETRIES}, got {retries}")));
            }
            RewardSpec::Http { url: url.clone(), timeout, retries: retries as u32 }
        }
        RewardKind::Model => {
            let path = required(&section.path, "path", "a Hugging Face sequence-classification model folder")?;
            let batch = section.batch.unwrap_or(16);
            if !(1..=MAX_MODEL_BATCH).contains(&batch) {
                return Err((key("batch"), format!("must be from 1 to {MAX_MODEL_BATCH}, got {batch}")));
            }
            RewardSpec::Model { path: PathBuf::from(path), batch: batch as usize }
        }
    })
}

fn key(name: &str) -> String {
    format!("{SECTION}.{name}")
}

fn field(section: &RewardSection) -> Result<String, (String, String)> {
    match section.field.as_deref() {
        None => Ok("answer".into()),
        Some(f) if f.trim().is_empty() => Err((key("field"), "must name a record field".into())),
        Some(f) => Ok(f.to_string()),
    }
}

fn required<'a>(value: &'a Option<String>, name: &str, what: &str) -> Result<&'a String, (String, String)> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err((key(name), format!("must not be empty: give {what}"))),
        None => Err((key(name), format!("missing: kind \"{}\" needs {what}", kind_needing(name)))),
    }
}

fn kind_needing(name: &str) -> &'static str {
    match name {
        "pattern" => "regex",
        "url" => "http",
        _ => "model",
    }
}

/// `http://host[:port][/path]`: plain HTTP only (no TLS client is built in).
fn check_http_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("`{url}` is not an http:// URL (https and other schemes are not supported)"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') || authority.chars().any(char::is_whitespace) {
        return Err(format!("`{url}` has no valid host"));
    }
    if let Some((host, port)) = authority.rsplit_once(':')
        && !host.ends_with(']')
        && !(port.is_empty() || port.parse::<u16>().is_ok())
    {
        return Err(format!("`{url}`: `{port}` is not a port number"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RewardSpec, (String, String)> {
        let section: RewardSection = toml::from_str(text).map_err(|e| ("(parse)".to_string(), e.to_string()))?;
        resolve_reward(&section)
    }

    fn err(text: &str) -> (String, String) {
        parse(text).unwrap_err()
    }

    #[test]
    fn kinds_resolve_with_their_defaults() {
        assert_eq!(parse("kind = \"exact\"").unwrap(), RewardSpec::Exact { field: "answer".into() });
        assert_eq!(
            parse("kind = \"numeric\"\nfield = \"target\"").unwrap(),
            RewardSpec::Numeric { field: "target".into(), tolerance: 1e-6 }
        );
        assert_eq!(
            parse("kind = \"numeric\"\ntolerance = 0").unwrap(),
            RewardSpec::Numeric { field: "answer".into(), tolerance: 0.0 }
        );
        assert_eq!(
            parse("kind = \"regex\"\npattern = '^<think>.*</think>'").unwrap(),
            RewardSpec::Regex { pattern: "^<think>.*</think>".into() }
        );
        assert_eq!(
            parse("kind = \"http\"\nurl = \"http://127.0.0.1:8000/score\"").unwrap(),
            RewardSpec::Http {
                url: "http://127.0.0.1:8000/score".into(),
                timeout: Duration::from_secs(10),
                retries: 2
            }
        );
        assert_eq!(
            parse("kind = \"http\"\nurl = \"http://rm\"\ntimeout_s = 0.5\nretries = 0").unwrap(),
            RewardSpec::Http { url: "http://rm".into(), timeout: Duration::from_millis(500), retries: 0 }
        );
        assert_eq!(
            parse("kind = \"model\"\npath = \"rm/qwen\"").unwrap(),
            RewardSpec::Model { path: "rm/qwen".into(), batch: 16 }
        );
    }

    #[test]
    fn keys_of_another_kind_are_refused_by_name() {
        let (k, m) = err("kind = \"exact\"\ntolerance = 0.1");
        assert_eq!(k, "rl.reward.tolerance");
        assert!(m.contains("\"exact\"") && m.contains("\"numeric\""), "{m}");
        let (k, m) = err("kind = \"regex\"\npattern = 'x'\nfield = \"answer\"");
        assert_eq!(k, "rl.reward.field");
        assert!(m.contains("\"exact\" or \"numeric\""), "{m}");
        assert_eq!(err("kind = \"model\"\npath = \"m\"\nurl = \"http://x\"").0, "rl.reward.url");
        assert_eq!(err("kind = \"http\"\nurl = \"http://x\"\nbatch = 4").0, "rl.reward.batch");
    }

    #[test]
    fn bad_values_name_their_key() {
        for t in ["-1", "nan", "inf"] {
            let (k, m) = err(&format!("kind = \"numeric\"\ntolerance = {t}"));
            assert_eq!(k, "rl.reward.tolerance", "{t}");
            assert!(m.contains("finite"), "{m}");
        }
        let (k, m) = err("kind = \"regex\"\npattern = '(unclosed'");
        assert_eq!(k, "rl.reward.pattern");
        assert!(m.contains("not a valid regular expression"), "{m}");
        assert_eq!(err("kind = \"regex\"").0, "rl.reward.pattern");
        assert_eq!(err("kind = \"regex\"\npattern = ''").0, "rl.reward.pattern");
        assert_eq!(err("kind = \"exact\"\nfield = ' '").0, "rl.reward.field");
        let (k, m) = err("kind = \"http\"");
        assert_eq!(k, "rl.reward.url");
        assert!(m.contains("missing"), "{m}");
        for url in ["https://rm/score", "ftp://x", "rm:80", "http://", "http:///x", "http://h:99999/", "http://a b/"] {
            let (k, m) = err(&format!("kind = \"http\"\nurl = \"{url}\""));
            assert_eq!(k, "rl.reward.url", "{url}: {m}");
        }
        for t in ["0", "-1", "1e300", "nan", "604801"] {
            let (k, m) = err(&format!("kind = \"http\"\nurl = \"http://x\"\ntimeout_s = {t}"));
            assert_eq!(k, "rl.reward.timeout_s", "{t}");
            assert!(m.contains("a week"), "{m}");
        }
        assert!(parse("kind = \"http\"\nurl = \"http://x\"\ntimeout_s = 604800").is_ok());
        assert_eq!(err("kind = \"http\"\nurl = \"http://x\"\nretries = 101").0, "rl.reward.retries");
        assert!(parse("kind = \"http\"\nurl = \"http://[::1]:8080/s\"\nretries = 100").is_ok());
        assert_eq!(err("kind = \"model\"").0, "rl.reward.path");
        assert_eq!(err("kind = \"model\"\npath = \"m\"\nbatch = 0").0, "rl.reward.batch");
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused_while_parsing() {
        let (_, m) = err("kind = \"exact\"\nfeild = \"answer\"");
        assert!(m.contains("feild"), "{m}");
        let (_, m) = err("kind = \"bleu\"");
        assert!(m.contains("`bleu` is not a reward kind") && m.contains("\"numeric\""), "{m}");
        let (_, m) = err("field = \"answer\"");
        assert!(m.contains("kind"), "{m}");
    }
}
