//! Preference pairs from JSONL in each of TRL's forms, rendered with the model folder's chat
//! template, and the lines that cannot be pairs, named by file and line.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use rtrain_rl::preference::data::{Pair, load_pairs};
use rtrain_trainer::hf::{ChatMessage, Tokenizer};

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures/hf/llama_tiny");
    Tokenizer::from_dir(&dir).unwrap()
}

fn file(dir: &Path, lines: &[&str]) -> PathBuf {
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn ids(tok: &Tokenizer, text: &str) -> Vec<i64> {
    tok.encode(text, false).unwrap().into_iter().map(i64::from).collect()
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into() }
}

#[test]
fn text_explicit_chat_and_implicit_chat_lines_give_the_same_pair() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        dir.path(),
        &[
            r#"{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.5}"#,
            r#"{"prompt": [{"role": "user", "content": "2+2="}], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}], "margin": 1.5}"#,
            r#"{"chosen": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}], "rejected": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "5"}], "margin": 1.5, "source": "ignored"}"#,
        ],
    );
    let read = load_pairs(&path, &tok, 64).unwrap();
    assert_eq!((read.pairs.len(), read.dropped), (3, 0));
    let user = [message("user", "2+2=")];
    let prompt = tok.apply_chat_template(&user, true).unwrap();
    let answer = |a: &str| {
        let full = tok.apply_chat_template(&[user[0].clone(), message("assistant", a)], false).unwrap();
        ids(&tok, full.strip_prefix(prompt.as_str()).unwrap())
    };
    let want = Pair { prompt: ids(&tok, &prompt), chosen: answer("4"), rejected: answer("5"), margin: 1.5 };
    assert!(!want.chosen.is_empty() && want.chosen != want.rejected);
    for (i, pair) in read.pairs.iter().enumerate() {
        assert_eq!(pair, &want, "line {}", i + 1);
    }
}

#[test]
fn pairs_cut_to_nothing_are_dropped_and_counted() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        dir.path(),
        &[
            r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#,
            r#"{"prompt": "a very long prompt that fills every slot", "chosen": "b", "rejected": "c"}"#,
        ],
    );
    let prompt_len = load_pairs(&path, &tok, 64).unwrap().pairs[0].prompt.len();
    let read = load_pairs(&path, &tok, prompt_len + 1).unwrap();
    assert_eq!((read.pairs.len(), read.dropped), (1, 1));
    assert_eq!(read.pairs[0].chosen.len(), 1, "responses are cut to data.max_len");
}

#[test]
fn lines_that_are_not_pairs_are_named() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#;
    let cases = [
        (r#"{"prompt": "a", "chosen": "b"}"#, "missing field `rejected`"),
        (r#"{"chosen": "b", "rejected": "c"}"#, "\"prompt\" is missing"),
        (
            r#"{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}"#,
            "all be text or all be chat",
        ),
        (
            r#"{"chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}"#,
            "share no prompt",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": [], "rejected": [{"role": "assistant", "content": "c"}]}"#,
            "at least one message",
        ),
        (r#"not json"#, "expected {\"prompt\", \"chosen\", \"rejected\"}"),
    ];
    for (line, needle) in cases {
        let path = file(dir.path(), &[good, line]);
        let e = load_pairs(&path, &tok, 64).unwrap_err().to_string();
        assert!(e.contains("pairs.jsonl:2") && e.contains(needle), "{line}: {e}");
    }
    let empty = file(dir.path(), &[""]);
    assert!(load_pairs(&empty, &tok, 64).unwrap_err().to_string().contains("no pair"));
}
