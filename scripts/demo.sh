#!/usr/bin/env bash
# Installs libtorch, builds rtrain and trains the demo GPT on two CPU workers.
# Extra arguments go to `rtrain launch`, e.g. `bash scripts/demo.sh --set train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-libtorch.sh
cargo build --release
exec target/release/rtrain launch configs/gpt_demo.toml --fresh "$@"
