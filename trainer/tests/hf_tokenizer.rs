//! The tokenizer against transformers' (fixtures/hf/tokenizer_reference.json): ids, decoding,
//! special tokens and the chat template.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use rtrain_trainer::hf::{ChatMessage, Tokenizer};

fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tokenizer_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2_tiny")).unwrap()
}

#[test]
fn encodes_and_decodes_like_transformers() {
    let r = reference();
    let tok = tokenizer();
    assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap());
    for case in r["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn special_tokens_come_from_the_model_folder() {
    let r = reference();
    let tok = tokenizer();
    assert_eq!(tok.bos.as_ref().unwrap().id as u64, r["bos_token_id"].as_u64().unwrap());
    assert_eq!(tok.eos.as_ref().unwrap().text, "<|end_of_text|>");
    assert_eq!(tok.pad.as_ref().unwrap().id as u64, r["pad_token_id"].as_u64().unwrap());
    assert!(tok.stop_ids.contains(&(r["eos_token_id"].as_u64().unwrap() as u32)));
    // The chat template closes a turn with <|im_end|>, which the folder does not name as an EOS:
    // a chat model's answer ends there all the same.
    let im_end = tok.encode("<|im_end|>", false).unwrap();
    assert_eq!(im_end.len(), 1);
    assert!(tok.stop_ids.contains(&im_end[0]), "{:?}", tok.stop_ids);
    // Nothing else of the template (its newline, the next turn's opening) ends generation.
    assert_eq!(tok.stop_ids.len(), 2, "{:?}", tok.stop_ids);
}

#[test]
fn chat_template_renders_like_transformers() {
    let r = reference();
    let chat = &r["chat"];
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
    let tok = tokenizer();
    let text = tok.apply_chat_template(&messages, chat["add_generation_prompt"].as_bool().unwrap()).unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap());
    let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
    assert_eq!(tok.encode(&text, false).unwrap(), want);
}

#[test]
fn bytes_round_trip() {
    let tok = Tokenizer::bytes();
    let ids = tok.encode("héllo", true).unwrap();
    assert_eq!(ids, "héllo".bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids, false).unwrap(), "héllo");
}
