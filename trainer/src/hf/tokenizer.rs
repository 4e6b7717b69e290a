//! Tokenizers: a model folder's `tokenizer.json` through the `tokenizers` crate, with its special
//! tokens and chat template from `tokenizer_config.json` (rendered by a Jinja engine, as
//! transformers' `apply_chat_template` does), or plain bytes for models trained from scratch.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::HfError;

/// One chat message, as chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    pub text: String,
    pub id: u32,
}

#[derive(Debug)]
enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Bytes,
}

#[derive(Debug)]
pub struct Tokenizer {
    inner: Inner,
    pub bos: Option<Special>,
    pub eos: Option<Special>,
    pub pad: Option<Special>,
    /// Every id that ends generation: the EOS token, the model's `eos_token_id`s and the chat
    /// template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`...).
    pub stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Bytes as tokens (ids 0–255), for the byte-level models rtrain trains from scratch.
    pub fn bytes() -> Self {
        Self { inner: Inner::Bytes, bos: None, eos: None, pad: None, stop_ids: Vec::new(), chat_template: None }
    }

    /// Reads `tokenizer.json`, and `tokenizer_config.json`, `config.json` and
    /// `generation_config.json` where present, from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, HfError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(HfError::Config { path, message: "not found: the model folder needs a tokenizer.json".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| HfError::Config { path: path.clone(), message: e.to_string() })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let token_id = |key: &str| -> Option<Special> {
            let value = config.as_ref()?.get(key)?;
            // A plain string, or an AddedToken object {"content": ...}.
            let text = value.as_str().or_else(|| value.get("content")?.as_str())?.to_string();
            let id = inner.token_to_id(&text)?;
            Some(Special { text, id })
        };
        let (bos, eos, pad) = (token_id("bos_token"), token_id("eos_token"), token_id("pad_token"));
        let chat_template =
            config.as_ref().and_then(|c| c.get("chat_template")).and_then(|t| t.as_str()).map(str::to_string);
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let mut stop_ids: Vec<u32> = eos.iter().map(|e| e.id).collect();
        for file in ["generation_config.json", "config.json"] {
            if let Some(json) = read_json(&dir.join(file))? {
                match json.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => stop_ids.extend(n.as_u64().map(|n| n as u32)),
                    Some(serde_json::Value::Array(ids)) => {
                        stop_ids.extend(ids.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                    }
                    _ => {}
                }
            }
        }
        let mut tokenizer = Self { inner: Inner::Hf(Box::new(inner)), bos, eos, pad, stop_ids, chat_template };
        tokenizer.stop_ids.extend(tokenizer.end_of_turn());
        tokenizer.stop_ids.sort_unstable();
        tokenizer.stop_ids.dedup();
        Ok(tokenizer)
    }

    /// The special token the chat template closes an assistant turn with, if it has one: what
    /// it renders right after an assistant message's text. A chat model ends its answer with it,
    /// and often names only another token as its EOS.
    fn end_of_turn(&self) -> Option<u32> {
        let Inner::Hf(inner) = &self.inner else { return None };
        let first = *self.encode(&self.turn_end_text()?, false).ok()?.first()?;
        inner.get_added_tokens_decoder().get(&first).filter(|t| t.special).map(|_| first)
    }

    /// What the chat template writes right after an assistant message's text (`<|im_end|>\n`),
    /// or `None` without a template (or one that renders no such turn).
    pub fn turn_end_text(&self) -> Option<String> {
        const MARK: &str = "rtrain-end-of-turn-probe";
        let messages = [
            ChatMessage { role: "user".into(), content: "hi".into() },
            ChatMessage { role: "assistant".into(), content: MARK.into() },
        ];
        let text = self.apply_chat_template(&messages, false).ok()?;
        Some(text[text.rfind(MARK)? + MARK.len()..].to_string())
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (a BOS,
    /// for tokenizers that add one), as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, HfError> {
        match &self.inner {
            Inner::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Inner::Hf(t) => t
                .encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| HfError::Config { path: "tokenizer.json".into(), message: format!("cannot encode: {e}") }),
        }
    }

    /// Text of `ids`, special tokens included unless `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, HfError> {
        match &self.inner {
            Inner::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Inner::Hf(t) => t
                .decode(ids, skip_special_tokens)
                .map_err(|e| HfError::Config { path: "tokenizer.json".into(), message: format!("cannot decode: {e}") }),
        }
    }

    /// The id of the special token written `text` (`<|im_end|>`), if the tokenizer has one:
    /// decoding skips special tokens, so a stop text naming one is matched by its id.
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        let Inner::Hf(inner) = &self.inner else { return None };
        let id = inner.token_to_id(text)?;
        inner.get_added_tokens_decoder().get(&id).filter(|t| t.special && t.content == text).map(|_| id)
    }

    /// The text of one token (e.g. `Ġthe`), for listings.
    pub fn token_text(&self, id: u32) -> String {
        match &self.inner {
            Inner::Bytes => String::from_utf8_lossy(&[id as u8]).into_owned(),
            Inner::Hf(t) => t.id_to_token(id).unwrap_or_default(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Bytes => 256,
            Inner::Hf(t) => t.get_vocab_size(true),
        }
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template of `tokenizer_config.json` for `messages`, with
    /// `add_generation_prompt` appending the assistant turn's opening.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, HfError> {
        let template = self.chat_template.as_deref().ok_or_else(|| HfError::Config {
            path: "tokenizer_config.json".into(),
            message: "the model has no chat_template".into(),
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers renders chat templates with trim_blocks and lstrip_blocks.
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(
            syntax.map_err(|e| HfError::Config { path: "tokenizer_config.json".into(), message: e.to_string() })?,
        );
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        let bad = |e: minijinja::Error| HfError::Config {
            path: "tokenizer_config.json".into(),
            message: format!("chat_template: {e}"),
        };
        env.add_template("chat", template).map_err(bad)?;
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| {
                let fields =
                    std::collections::BTreeMap::from([("role", m.role.clone()), ("content", m.content.clone())]);
                minijinja::Value::from(fields)
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_ref().map(|s| s.text.clone()).unwrap_or_default(),
            eos_token => self.eos.as_ref().map(|s| s.text.clone()).unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(bad)
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, HfError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| HfError::Config { path: path.to_path_buf(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HfError::Io { path: path.to_path_buf(), source }),
    }
}

/// GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell tokens: the
/// printable Latin-1 bytes stand for themselves, the others for the code points from 256 on, in
/// byte order.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(byte) {
        return char::from(byte);
    }
    let before = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + before).unwrap_or('\u{FFFD}')
}

/// A `tokenizer.json` of 256 byte tokens (id = byte value, no merges, no special tokens): the
/// byte-level BPE form transformers loads, for the built-in byte-level GPT.
pub fn write_byte_tokenizer(path: &Path) -> Result<(), HfError> {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..=255u8).map(|b| (byte_char(b).to_string(), serde_json::Value::from(b))).collect();
    let byte_level = |kind: &str| serde_json::json!({ "type": kind, "add_prefix_space": false, "trim_offsets": false, "use_regex": false });
    let doc = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level("ByteLevel"),
        "post_processor": null,
        "decoder": byte_level("ByteLevel"),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": [],
        },
    });
    let text = serde_json::to_string(&doc)
        .map_err(|e| HfError::Config { path: path.to_path_buf(), message: e.to_string() })?;
    std::fs::write(path, text).map_err(|source| HfError::Io { path: path.to_path_buf(), source })
}
