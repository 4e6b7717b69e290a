#!/usr/bin/env bash
# The GRPO demo, both phases: supervised fine-tuning of a tiny Llama from random weights on only
# 500 sums (learnt by heart; 27.0% of the held-out sums right), then 4000 GRPO steps with two
# rollout actors on 5000 other sums (92.0% on the same held-out sums; about 7.5 minutes on two
# shared cores in all; 85.0% with rl.max_staleness=1). Prints the held-out accuracy before and after.
#   bash examples/arith/run.sh                        (strictly on-policy)
#   bash examples/arith/run.sh --set rl.max_staleness=1
# Extra arguments go to the GRPO launch.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash scripts/setup-libtorch.sh
cargo build --release
R=target/release/rtrain
$R launch configs/grpo_arith_sft.toml --fresh
$R launch configs/grpo_arith.toml --fresh "$@"
