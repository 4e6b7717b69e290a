#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs libtorch, then builds and tests every
# crate, test and example (examples are built as programs, so tests can launch them). The NCCL
# backend is compiled in too (it loads NCCL at run time, so it builds without CUDA); the tests
# themselves run on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-libtorch.sh
# TensorBoard, for the test that reads the event files back with TensorBoard's own reader.
TEST_VENV="$HOME/.cache/rtrain/test-venv"
if ! "$TEST_VENV/bin/python" -c "import tensorboard" 2>/dev/null; then
  python3 -m venv "$TEST_VENV"
  "$TEST_VENV/bin/pip" install --quiet "tensorboard>=2.16"
fi
# From Debian's packages: Chromium, for the test that loads the dashboard in a real browser;
# iproute2, for the tests that simulate hosts with network namespaces; Slurm and munge, for the
# test that runs a job on a real two-node Slurm cluster started on this machine.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || missing+=(munge)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The tests that need what this script installs fail, rather than skip, when it is missing.
export RTRAIN_TEST_REQUIRE_ALL=1
# Test binaries find libtorch through their rpath; doctests are linked into a temporary folder,
# where only the library path helps.
export LD_LIBRARY_PATH="$PWD/.libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Two test threads: each end-to-end test runs several worker processes on CI's two cores.
cargo test --workspace --no-fail-fast --features rtrain-trainer/nccl -- --test-threads 2
