//! `rtrain generate` and `rtrain score`: a Hugging Face model folder on the CPU (or a GPU), for
//! users and for checks.

use std::process::ExitCode;

use rtrain_launcher::cli::{EXIT_CONFIG, EXIT_FAILED, GenerateArgs, ScoreArgs};

use crate::hf::{ChatMessage, HfModel, SamplingParams, Tokenizer, generate, score};
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
    let (model, tokenizer) = match load(&args.model, args.cuda) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let text = if args.chat {
        let messages = [ChatMessage { role: "user".into(), content: args.prompt.clone() }];
        match tokenizer.apply_chat_template(&messages, true) {
            Ok(t) => t,
            Err(e) => return fail(e),
        }
    } else {
        args.prompt.clone()
    };
    // A chat template writes its own special tokens; plain text gets the tokenizer's (a BOS).
    let prompt = match tokenizer.encode(&text, !args.chat) {
        Ok(ids) => ids,
        Err(e) => return fail(e),
    };
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_token_ids: Vec::new(),
        stop_strings: args.stop.clone(),
    };
    let prompts = vec![prompt; args.num_samples];
    let outputs = match generate(&model, &tokenizer, &prompts, &params) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    for (i, g) in outputs.iter().enumerate() {
        if args.json {
            println!("{}", serde_json::to_string(g).unwrap_or_default());
        } else {
            if outputs.len() > 1 {
                println!("--- sample {i} ({} tokens, {:?})", g.token_ids.len(), g.finish_reason);
            }
            println!("{}{}", if args.chat { "" } else { args.prompt.as_str() }, g.text);
        }
    }
    ExitCode::SUCCESS
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
