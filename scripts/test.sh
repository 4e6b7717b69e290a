#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs libtorch, then builds and tests every
# crate, test, example and benchmark. The NCCL backend is compiled in too (it loads NCCL at run
# time, so it builds without CUDA); the tests themselves run on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-libtorch.sh
# Two test threads: each end-to-end test runs several worker processes on CI's two cores.
cargo test --workspace --all-targets --features rtrain-trainer/nccl -- --test-threads 2
