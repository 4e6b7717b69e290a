//! Fine-tuning examples: which tokens are trained, for prompt/response pairs and chats, with and
//! without a chat template.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use rtrain_trainer::hf::Tokenizer;
use rtrain_trainer::sft::load_examples;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2_tiny")).unwrap()
}

fn trained_text(tok: &Tokenizer, ids: &[i64], trained: &[bool]) -> String {
    let picked: Vec<u32> = ids.iter().zip(trained).filter(|(_, t)| **t).map(|(i, _)| *i as u32).collect();
    tok.decode(&picked, false).unwrap()
}

#[test]
fn only_assistant_text_is_trained() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    std::fs::write(
        &path,
        concat!(
            "{\"prompt\": \"What is 2+2?\", \"response\": \"4\"}\n",
            "\n",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, ",
            "{\"role\": \"assistant\", \"content\": \"Hello\"}, {\"role\": \"user\", \"content\": \"Bye\"}, {\"role\": \"assistant\", \"content\": \"Ciao\"}]}\n",
        ),
    )
    .unwrap();
    let tok = tokenizer();
    let examples = load_examples(&path, &tok, 200).unwrap();
    assert_eq!(examples.len(), 2);
    let pair = &examples[0];
    assert_eq!(
        tok.decode(&pair.ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).unwrap(),
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    );
    assert_eq!(trained_text(&tok, &pair.ids, &pair.trained), "4<|im_end|>\n");
    let chat = &examples[1];
    assert_eq!(trained_text(&tok, &chat.ids, &chat.trained), "Hello<|im_end|>\nCiao<|im_end|>\n");

    // Cut before any response token: dropped.
    let short = load_examples(&path, &tok, 5);
    assert!(short.is_err(), "nothing left to train");
}
