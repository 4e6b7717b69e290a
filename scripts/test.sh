#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs libtorch, builds, tests, and checks
# that the NCCL backend compiles (it needs no CUDA to build).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-libtorch.sh
# Two test binaries at a time: each end-to-end test runs several worker processes.
cargo test --workspace --all-targets -- --test-threads 2
cargo check -p rtrain-trainer --features nccl
