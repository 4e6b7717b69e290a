//! Loads each transformers fixture model and saves it again with rtrain, for
//! `trainer/tests/fixtures/hf/check_saved_with_transformers.py` to open in transformers:
//!
//!     cargo run --release --example save_hf_fixtures -- /tmp/saved

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rtrain_trainer::hf::HfModel;
use tch::{Device, Kind};

fn main() -> ExitCode {
    let Some(out) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: save_hf_fixtures OUT_DIR");
        return ExitCode::from(2);
    };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("trainer/tests/fixtures/hf");
    for name in ["llama_tiny", "llama3_sharded", "qwen2_tiny", "llama_bf16", "gpt2_tiny"] {
        let result = HfModel::load(&fixtures.join(name), Device::Cpu).and_then(|m| {
            let kind = if name == "llama_bf16" { Kind::BFloat16 } else { Kind::Float };
            let shard = if name == "llama3_sharded" { 150_000 } else { usize::MAX };
            m.save(&out.join(name), kind, shard)
        });
        if let Err(e) = result {
            eprintln!("error: {name}: {e}");
            return ExitCode::from(1);
        }
        println!("saved {}", out.join(name).display());
    }
    ExitCode::SUCCESS
}
