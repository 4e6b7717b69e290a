#!/usr/bin/env bash
# The RLHF pipeline on a task with a hidden rule (examples/rlhf/make_rlhf.py: the answer alone
# beats an answer with text after it):
#   1. SFT of a tiny Llama from random weights on sloppy examples   (configs/rlhf/sft.toml)
#   2. a reward model trained on preference pairs                    (configs/rlhf/rm.toml)
#   3. PPO of the SFT policy against that reward model               (configs/rlhf/ppo.toml)
#   4. DPO of the SFT policy on the same pairs, for comparison       (configs/rlhf/dpo.toml)
# then samples each policy on held-out prompts and prints the reward model's held-out accuracy
# and each policy's win rate by the rule (also in RUN_DIR/rlhf_summary.json).
#   bash examples/rlhf/run.sh RUN_DIR
set -euo pipefail
RUN_DIR="${1:?usage: bash examples/rlhf/run.sh RUN_DIR}"
cd "$(dirname "$0")/../.."

bash scripts/setup-libtorch.sh
cargo build --release
R=target/release/rtrain
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
SFT="$RUN_DIR/rlhf_sft/model"
at() { echo "== $1 ($(date +%T))"; }

at "1/4 supervised fine-tuning"
$R launch configs/rlhf/sft.toml --fresh --set job.run_dir="$RUN_DIR"
at "2/4 reward model"
$R launch configs/rlhf/rm.toml --fresh --set job.run_dir="$RUN_DIR" --set model.path="$SFT"
at "3/4 PPO against the reward model"
$R launch configs/rlhf/ppo.toml --fresh --set job.run_dir="$RUN_DIR" --set model.path="$SFT" \
  --set rl.reward.path="$RUN_DIR/rlhf_rm/model"
at "4/4 DPO on the same pairs"
$R launch configs/rlhf/dpo.toml --fresh --set job.run_dir="$RUN_DIR" --set model.path="$SFT"

at "judging the policies on held-out prompts"
for policy in sft ppo dpo; do
  $R generate --model "$RUN_DIR/rlhf_$policy/model" --prompts examples/rlhf/held_out.jsonl \
    --num-samples 4 --temperature 1 --max-new-tokens 8 --seed 0 --json > "$RUN_DIR/generations_$policy.jsonl"
done
python3 examples/rlhf/judge.py "$RUN_DIR"
