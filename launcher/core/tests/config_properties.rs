//! Property tests over the config loader and the `--set` parser: whatever the input, loading
//! ends in a config or in an error with a message, never a panic. Bounded budgets keep the
//! suite fast; `PROPTEST_CASES=N` runs more.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rtrain_core::config::{apply_override, load};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

/// The shipped example configs, as (file, text).
fn examples() -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(configs_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    out.sort();
    out
}

/// Every dotted key the example configs set (e.g. `train.lr`), plus a few they leave out.
fn known_keys() -> Vec<String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if let toml::Value::Table(inner) = v {
                walk(&key, inner, out);
            }
            out.push(key);
        }
    }
    let mut keys = Vec::new();
    for (_, text) in examples() {
        walk("", &text.parse::<toml::Table>().unwrap(), &mut keys);
    }
    for extra in [
        "rendezvous.timeout_s",
        "rendezvous.heartbeat_s",
        "fault.heartbeat_timeout_s",
        "fault.backoff_s",
        "fault.max_backoff_s",
        "fault.max_restarts",
        "fault.max_user_restarts",
        "train.collective_timeout_s",
        "train.workers",
        "train.micro_batch",
        "train.grad_accum",
        "train.steps",
        "checkpoint.every",
        "checkpoint.keep_last",
        "roles.actor.size",
        "roles.actor.backoff_s",
    ] {
        keys.push(extra.to_string());
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Right-hand sides that stress types and ranges: numbers at the edges, strings, arrays,
/// inline tables, and arbitrary text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        prop::sample::select(vec![
            "0",
            "-1",
            "1e300",
            "-1e300",
            "1e19",
            "1e-320",
            "inf",
            "-inf",
            "nan",
            "18446744073709551616",
            "true",
            "\"\"",
            "[]",
            "{}",
            "[1, 2]",
            "{ min = 0, max = 0 }",
            "{ min = 3, max = 1 }",
            "{ min = 1, max = 1e300 }",
            "\"auto\"",
            "\"cuda\"",
            "[\"\"]",
            "0.5",
            "1.5",
        ])
        .prop_map(str::to_string),
        "\\PC{0,12}",
        "[a-z0-9_.={}\\[\\], \"-]{0,16}",
    ]
}

fn specs() -> impl Strategy<Value = Vec<String>> {
    let keys = known_keys();
    let key = prop_oneof![4 => prop::sample::select(keys), 1 => "[a-z._]{0,12}"];
    prop::collection::vec((key, value()).prop_map(|(k, v)| format!("{k}={v}")), 1..4)
}

fn cases() -> ProptestConfig {
    // Each case loads a config from disk: 256 keep the test to a few seconds.
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn set_overrides_give_a_config_or_a_message(file in 0usize..64, sets in specs()) {
        let examples = examples();
        let (path, _) = &examples[file % examples.len()];
        if let Err(e) = load(path, &sets) {
            prop_assert!(!e.to_string().trim().is_empty(), "an error without a message for {sets:?}");
        }
    }

    #[test]
    fn the_set_parser_takes_any_text(spec in "\\PC{0,40}") {
        let mut table = toml::Table::new();
        if let Err(e) = apply_override(&mut table, &spec) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }

    #[test]
    fn edited_config_files_give_a_config_or_a_message(
        file in 0usize..64,
        line in 0usize..200,
        replacement in value(),
        cut in prop::option::of(0usize..4000),
    ) {
        let examples = examples();
        let (_, text) = &examples[file % examples.len()];
        // One line's value replaced, and maybe the file cut short anywhere.
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let at = line % lines.len().max(1);
        if let Some((key, _)) = lines.get(at).and_then(|l| l.split_once('=')) {
            lines[at] = format!("{key}= {replacement}");
        }
        let mut edited = lines.join("\n");
        if let Some(cut) = cut {
            let mut end = cut.min(edited.len());
            while !edited.is_char_boundary(end) {
                end -= 1;
            }
            edited.truncate(end);
        }
        let dir = tempfile::tempdir().unwrap();
        let edited_path = dir.path().join("edited.toml");
        std::fs::write(&edited_path, edited).unwrap();
        if let Err(e) = load(&edited_path, &[]) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }
}
