//! `rtrain generate` and `rtrain score`: a Hugging Face model folder on the CPU (or a GPU), for
//! users and for checks.

use std::process::ExitCode;

use rtrain_launcher::cli::{EXIT_CONFIG, EXIT_FAILED, GenerateArgs, ScoreArgs};

use super::gpt_generate::{ByteGpt, gpt_checkpoint};
use crate::data::splitmix::SplitMix64;
use crate::hf::{ChatMessage, Generation, HfModel, SamplingParams, Tokenizer, generate, score};
use tch::Device;

fn device(cuda: Option<usize>) -> Device {
    cuda.map_or(Device::Cpu, Device::Cuda)
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILED)
}

pub fn generate_command(args: &GenerateArgs) -> ExitCode {
    let bad = if args.num_samples == 0 {
        Some("--num-samples must be at least 1".to_string())
    } else if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        Some(format!("--top-p must be in (0, 1], got {}", args.top_p))
    } else if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        Some(format!("--temperature must be a number from 0 (greedy) up, got {}", args.temperature))
    } else if args.stop.iter().any(String::is_empty) {
        Some("--stop takes a non-empty text (an empty one would end every sequence at once)".to_string())
    } else {
        None
    };
    if let Some(message) = bad {
        eprintln!("error: {message}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let texts = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(path)) => match read_prompts(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        (None, None) => return fail("name --prompt or --prompts"),
    };
    let model = match gpt_checkpoint(&args.model) {
        Err(e) => return fail(e),
        Ok(Some(_)) if args.chat => {
            eprintln!("error: --chat needs a chat template; the built-in byte-level GPT has none");
            return ExitCode::from(EXIT_CONFIG);
        }
        Ok(Some(ckpt)) => {
            if let Some(index) = args.cuda
                && let Err(e) = crate::cuda::require_cuda(index)
            {
                return fail(format!("--cuda {index}: {e}"));
            }
            match ByteGpt::load(&ckpt, device(args.cuda)) {
                Ok(gpt) => Generator::Gpt(gpt),
                Err(e) => return fail(e),
            }
        }
        Ok(None) => match load(&args.model, args.cuda) {
            Ok((model, tokenizer)) => Generator::Hf(Box::new(model), tokenizer),
            Err(code) => return code,
        },
    };
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_token_ids: Vec::new(),
        stop_strings: args.stop.clone(),
        logprobs_at_temperature: false,
    };
    for (chunk_no, chunk) in texts.chunks(PROMPTS_PER_BATCH).enumerate() {
        // Each batch samples from its own stream, so a file's output does not depend on how it is cut.
        let params = SamplingParams { seed: args.seed.wrapping_add(chunk_no as u64), ..params.clone() };
        let (model, tokenizer) = match &model {
            Generator::Hf(model, tokenizer) => (model, tokenizer),
            Generator::Gpt(gpt) => {
                let mut rng = SplitMix64::new(params.seed);
                let outputs: Result<Vec<Generation>, String> = chunk
                    .iter()
                    .flat_map(|text| std::iter::repeat_n(text, args.num_samples))
                    .map(|text| gpt.generate(text, &params, &mut rng))
                    .collect();
                match outputs {
                    Ok(outputs) => print_outputs(args, chunk_no, chunk, &outputs),
                    Err(e) => return fail(e),
                }
                continue;
            }
        };
        let mut prompts = Vec::new();
        for text in chunk {
            let ids = if args.chat {
                let messages = [ChatMessage { role: "user".into(), content: text.clone() }];
                tokenizer.apply_chat_template(&messages, true).and_then(|t| tokenizer.encode(&t, false))
            } else {
                // Plain text gets the tokenizer's special tokens (a BOS); a chat template writes its own.
                tokenizer.encode(text, true)
            };
            match ids {
                Ok(ids) => prompts.extend(std::iter::repeat_n(ids, args.num_samples)),
                Err(e) => return fail(e),
            }
        }
        let outputs = match generate(model, tokenizer, &prompts, &params) {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        print_outputs(args, chunk_no, chunk, &outputs);
    }
    ExitCode::SUCCESS
}

/// What generates: a Hugging Face model folder, or the built-in GPT from a checkpoint.
enum Generator {
    Hf(Box<HfModel>, Tokenizer),
    Gpt(ByteGpt),
}

/// One batch's generations: text, or one JSON object per sequence.
fn print_outputs(args: &GenerateArgs, chunk_no: usize, chunk: &[String], outputs: &[Generation]) {
    {
        for (i, g) in outputs.iter().enumerate() {
            let (line, text) = (chunk_no * PROMPTS_PER_BATCH + i / args.num_samples, &chunk[i / args.num_samples]);
            if args.json {
                let mut value = serde_json::to_value(g).unwrap_or_default();
                if args.prompts.is_some()
                    && let Some(obj) = value.as_object_mut()
                {
                    obj.insert("prompt_line".into(), (line + 1).into());
                    obj.insert("prompt".into(), text.clone().into());
                }
                println!("{value}");
            } else {
                if outputs.len() > 1 {
                    println!("--- sample {i} ({} tokens, {:?})", g.token_ids.len(), g.finish_reason);
                }
                println!("{}{}", if args.chat { "" } else { text.as_str() }, g.text);
            }
        }
    }
}

/// Prompts per generation batch with `--prompts`.
const PROMPTS_PER_BATCH: usize = 64;

/// The `prompt` of every line of a JSONL file.
fn read_prompts(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        match value.get("prompt").and_then(|p| p.as_str()) {
            Some("") => return Err(format!("{}:{}: the prompt is empty", path.display(), n + 1)),
            Some(p) => prompts.push(p.to_string()),
            None => return Err(format!("{}:{}: expected {{\"prompt\": \"...\"}}", path.display(), n + 1)),
        }
    }
    if prompts.is_empty() {
        return Err(format!("{} holds no prompt", path.display()));
    }
    Ok(prompts)
}

pub fn score_command(args: &ScoreArgs) -> ExitCode {
    let (model, tokenizer) = match load(&args.model, args.cuda) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let ids = match tokenizer.encode(&args.text, true) {
        Ok(ids) => ids,
        Err(e) => return fail(e),
    };
    let scores = match score(&model, &ids) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut total = 0.0;
    for (id, lp) in ids.iter().zip(&scores) {
        let token = tokenizer.token_text(*id);
        total += lp.unwrap_or(0.0);
        if args.json {
            println!("{}", serde_json::json!({ "token_id": id, "token": token, "logprob": lp }));
        } else {
            println!("{id:>8}  {:>10}  {token:?}", lp.map_or("-".to_string(), |l| format!("{l:.4}")));
        }
    }
    if !args.json {
        println!("total log-prob {total:.4} over {} predicted tokens", ids.len().saturating_sub(1));
    }
    ExitCode::SUCCESS
}

fn load(dir: &std::path::Path, cuda: Option<usize>) -> Result<(HfModel, Tokenizer), ExitCode> {
    // Before any other tch call: libtorch's CUDA backend is loaded here (see crate::cuda).
    if let Some(index) = cuda {
        crate::cuda::require_cuda(index).map_err(|e| fail(format!("--cuda {index}: {e}")))?;
    }
    let model = HfModel::load(dir, device(cuda)).map_err(fail)?;
    let tokenizer = Tokenizer::from_dir(dir).map_err(fail)?;
    Ok((model, tokenizer))
}
