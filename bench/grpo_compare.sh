#!/usr/bin/env bash
# Side-by-side GRPO benchmark on CPU: rtrain vs TRL's GRPOTrainer on the same tiny Llama (the
# arithmetic demo's, fine-tuned here for a few steps), the same prompts and group settings.
# Prints time per RL step and generated tokens/s for both, with the ratio beside its target
# (rtrain >= 5x TRL), then rtrain's weight-sync bandwidth against memcpy (target >= 50%).
#
# Run with: bash bench/grpo_compare.sh
#           STEPS=20 PROMPTS_PER_STEP=16 GROUP_SIZE=8 MAX_NEW_TOKENS=4 bash bench/grpo_compare.sh
#           BENCH_DIR=/tmp/grpo-bench bash bench/grpo_compare.sh   (scratch dir, kept afterwards)
# Python packages go into BENCH_VENV (default ~/.cache/rtrain/bench-venv), installed when missing.
# STRICT=1 makes a missed target exit with status 3. Nothing is written into the repository.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS="${STEPS:-20}"                    # timed RL steps on each side
WARMUP="${WARMUP:-2}"                   # RL steps run first on each side, not timed
PROMPTS_PER_STEP="${PROMPTS_PER_STEP:-16}"
GROUP_SIZE="${GROUP_SIZE:-8}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-4}"
MICRO_BATCH="${MICRO_BATCH:-64}"        # completions per forward/backward, both sides
SFT_STEPS="${SFT_STEPS:-50}"
SYNC_MB="${SYNC_MB:-100,500}"           # weight-set sizes for the weight-sync figure
STRICT="${STRICT:-0}"
VENV="${BENCH_VENV:-$HOME/.cache/rtrain/bench-venv}"
RTRAIN=target/release/rtrain
SYNC_BENCH=target/release/examples/weight_sync_bench

die() { echo "grpo_compare: $*" >&2; exit 1; }
say() { echo "== $*"; }
for v in STEPS WARMUP PROMPTS_PER_STEP GROUP_SIZE MAX_NEW_TOKENS MICRO_BATCH SFT_STEPS; do
  [[ "${!v}" =~ ^[0-9]+$ ]] && (( ${!v} >= 1 )) || die "$v must be a positive integer, got '${!v}'"
done

if [[ -n "${BENCH_DIR:-}" ]]; then
  WORK="$BENCH_DIR"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/rtrain-grpo-compare.XXXXXX")"
  # Removed after a run that ends well; kept, with its logs, after one that does not.
  trap 'rc=$?; if (( rc == 0 )); then rm -rf "$WORK"; else echo "grpo_compare: logs kept in $WORK" >&2; fi' EXIT
fi
WORK="$(cd "$WORK" && pwd)"
say "scratch dir $WORK"

# ---- build (not timed) ------------------------------------------------------------------------
say "building rtrain (scripts/setup-libtorch.sh, cargo build --release; not timed)"
bash scripts/setup-libtorch.sh
cargo build --release -j "${CARGO_JOBS:-1}"
cargo build --release -j "${CARGO_JOBS:-1}" -p rtrain-rl --example weight_sync_bench
[[ -x "$RTRAIN" && -x "$SYNC_BENCH" ]] || die "cargo build succeeded but $RTRAIN or $SYNC_BENCH is missing"

# ---- Python side: torch (CPU build when its index is reachable), transformers, trl, datasets ----
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating the virtual environment $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
PY="$VENV/bin/python"
missing=()
for mod in torch transformers trl datasets; do
  "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$mod")
done
if (( ${#missing[@]} )); then
  say "installing into $VENV: ${missing[*]}"
  if [[ " ${missing[*]} " == *" torch "* ]]; then
    "$PY" -m pip install --retries 1 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu \
      || { say "the CPU wheel index is not reachable: installing torch from PyPI (the CUDA build, a few GB)"
           "$PY" -m pip install torch; }
  fi
  rest=()
  for mod in "${missing[@]}"; do [[ "$mod" == torch ]] || rest+=("$mod"); done
  (( ${#rest[@]} )) && "$PY" -m pip install "${rest[@]}"
fi
"$PY" -c "import torch, transformers, trl, datasets" || die "the Python packages do not import (see above)"

# ---- the model: the arithmetic demo's tiny Llama, fine-tuned briefly by rtrain ------------------
# make_arith.py writes next to itself: a copy in the scratch dir keeps the repository untouched.
mkdir -p "$WORK/arith" "$WORK/runs"
cp examples/arith/make_arith.py "$WORK/arith/"
python3 "$WORK/arith/make_arith.py" >/dev/null
MODEL="$WORK/runs/arith_sft/model"
say "fine-tuning the tiny Llama: $RTRAIN launch configs/grpo_arith_sft.toml (steps=$SFT_STEPS)"
"$RTRAIN" launch configs/grpo_arith_sft.toml --fresh --set "train.steps=$SFT_STEPS" \
    --set "job.run_dir=$WORK/runs" --set "data.source=$WORK/arith/sft.jsonl" \
    --set "model.path=$WORK/arith/tiny_llama" >"$WORK/sft.log" 2>&1 \
  || { tail -n 40 "$WORK/sft.log" >&2; die "the fine-tuning run failed (log tail above)"; }
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
  [[ -f "$MODEL/$f" ]] || die "the fine-tuned model folder lacks $f"
done

# Both sides must see the same model and the same prompt tokens: transformers loads the folder,
# encodes a prompt as rtrain does (<s> then one token per character) and gives the same
# log-probabilities as `rtrain score`.
"$RTRAIN" score --model "$MODEL" --text "37+45=82" --json >"$WORK/score.jsonl"
"$PY" bench/check_hf_load.py "$MODEL" "$WORK/score.jsonl" "37+45=82" 2>"$WORK/hf_check.log" \
  || { tail -n 20 "$WORK/hf_check.log" >&2; die "transformers does not load $MODEL as rtrain does"; }

# ---- rtrain GRPO ------------------------------------------------------------------------------
SETTINGS="prompts_per_step=$PROMPTS_PER_STEP group_size=$GROUP_SIZE max_new_tokens=$MAX_NEW_TOKENS"
say "rtrain: $RTRAIN launch configs/grpo_arith.toml ($SETTINGS, steps=$((WARMUP + STEPS)))"
"$RTRAIN" launch configs/grpo_arith.toml --fresh --set "model.path=$MODEL" \
    --set "job.run_dir=$WORK/runs" --set "train.steps=$((WARMUP + STEPS))" \
    --set "rl.prompts_per_step=$PROMPTS_PER_STEP" --set "rl.group_size=$GROUP_SIZE" \
    --set "rl.max_new_tokens=$MAX_NEW_TOKENS" --set "train.micro_batch=$MICRO_BATCH" \
    --set "data.max_len=$((8 + MAX_NEW_TOKENS))" \
    --set "data.source=$WORK/arith/prompts.jsonl" --set "rl.eval_path=$WORK/arith/held_out.jsonl" \
    >"$WORK/rtrain_grpo.log" 2>&1 \
  || { tail -n 40 "$WORK/rtrain_grpo.log" >&2; die "rtrain's GRPO run failed (log tail above)"; }

# ---- TRL GRPOTrainer --------------------------------------------------------------------------
say "TRL: bench/grpo_trl.py ($SETTINGS, steps=$WARMUP+$STEPS)"
"$PY" bench/grpo_trl.py --model "$MODEL" --prompts "$WORK/arith/prompts.jsonl" \
    --prompts-per-step "$PROMPTS_PER_STEP" --group-size "$GROUP_SIZE" \
    --max-new-tokens "$MAX_NEW_TOKENS" --micro-batch "$MICRO_BATCH" \
    --steps "$STEPS" --warmup-steps "$WARMUP" >"$WORK/trl.log" 2>&1 \
  || { grep -E 'Error|error' "$WORK/trl.log" | tail -n 20 >&2 || tail -n 40 "$WORK/trl.log" >&2
       die "TRL's GRPOTrainer run failed (log lines above; whole log: $WORK/trl.log)"; }
grep '^{"framework": "trl"' "$WORK/trl.log" | tail -n 1 >"$WORK/trl.json"
[[ -s "$WORK/trl.json" ]] || die "no result line from bench/grpo_trl.py ($WORK/trl.log)"

# ---- weight sync against memcpy ---------------------------------------------------------------
say "weight sync: $SYNC_BENCH --mb $SYNC_MB --rounds 5"
"$SYNC_BENCH" --mb "$SYNC_MB" --rounds 5 --json >"$WORK/weight_sync.jsonl"

# ---- report -----------------------------------------------------------------------------------
python3 - "$WORK/runs/grpo_arith/metrics.jsonl" "$WORK/trl.json" "$WORK/weight_sync.jsonl" \
    "$WARMUP" "$STEPS" "$STRICT" "$SETTINGS" <<'PY'
import json, os, statistics, sys

metrics, trl_path, sync_path, warmup, steps, strict, settings = sys.argv[1:]
warmup, steps = int(warmup), int(steps)

# rtrain: rank 0's RL line per step; `time` is when the step's metrics were reported, so step
# i took time[i] - time[i-1]. Timed: the steps after the warm-up ones.
by_step = {}
for line in open(metrics):
    m = json.loads(line)
    if m.get("role") == "trainer" and "reward_mean" in m:
        by_step[int(m["step"])] = m  # the last report of a step wins
rows = [by_step[s] for s in sorted(by_step)]
if len(rows) != warmup + steps:
    sys.exit(f"grpo_compare: rtrain reported {len(rows)} RL steps, expected {warmup + steps}")
timed = rows[warmup:]
elapsed = timed[-1]["time"] - rows[warmup - 1]["time"] if warmup else None
if elapsed is None:
    sys.exit("grpo_compare: WARMUP must be at least 1 (the first step's start is not reported)")
tokens = [m["response_length"] * m["samples"] for m in timed]
rt = {
    "step_time_s": elapsed / len(timed),
    "tokens_per_s": sum(tokens) / elapsed,
    "generate_tokens_per_s": sum(tokens) / sum(t / m["rollout_tokens_per_s"] for t, m in zip(tokens, timed)),
    "response_length": sum(tokens) / sum(m["samples"] for m in timed),
    "accuracy": statistics.mean(m.get("accuracy", float("nan")) for m in timed),
}
trl = json.loads(open(trl_path).read())
ratio = rt["tokens_per_s"] / trl["tokens_per_s"]

print(f"\nGRPO on CPU, {os.cpu_count()} cores, the tiny arithmetic Llama fine-tuned for this run; {settings}; "
      f"{steps} timed steps after {warmup} warm-up on each side")
print(f"TRL {trl['trl']}, transformers {trl['transformers']}, torch {trl['torch']} ({trl['threads']} threads)\n")
w = 38
print(f"{'':{w}} {'rtrain':>10} {'TRL':>10} {'ratio':>8}  target")
print(f"{'time per RL step (s)':{w}} {rt['step_time_s']:>10.3f} {trl['step_time_s']:>10.3f} "
      f"{trl['step_time_s'] / rt['step_time_s']:>7.2f}x  (TRL's time / rtrain's)")
met = ratio >= 5.0
print(f"{'generated tokens/s (whole RL step)':{w}} {rt['tokens_per_s']:>10,.0f} {trl['tokens_per_s']:>10,.0f} "
      f"{ratio:>7.2f}x  >= 5x {'(met)' if met else '(MISSED)'}")
print(f"{'generated tokens/s (generation only)':{w}} {rt['generate_tokens_per_s']:>10,.0f} "
      f"{trl['generate_tokens_per_s']:>10,.0f} {rt['generate_tokens_per_s'] / trl['generate_tokens_per_s']:>7.2f}x")
print(f"{'mean completion length (tokens)':{w}} {rt['response_length']:>10.2f} {trl['response_length']:>10.2f}")
print(f"{'reward (share right)':{w}} {rt['accuracy']:>10.3f} {trl['accuracy']:>10.3f}")
print("generated tokens/s = completion tokens (EOS included) of the timed steps / their wall time;\n"
      "generation only = the same tokens / the time spent generating (rtrain: its actors' rollout time).")

sync = [json.loads(l) for l in open(sync_path) if l.strip()]
print(f"\n{'rtrain weight sync, one host':{w}} {'sync GB/s':>10} {'memcpy GB/s':>12} {'sync/memcpy':>12}  target")
for r in sync:
    gbps = r["bytes"] / r["sync_s"] / 1e9
    mem = r["bytes"] / r["memcpy_s"] / 1e9
    target = ""
    if r["transport"] == "shm":
        ok = r["sync_vs_memcpy"] >= 0.5
        met = met and ok
        target = f">= 50% {'(met)' if ok else '(MISSED)'}"
    label = f"{r['bytes'] / 1e6:.1f} MB {r['transport']}"
    print(f"{label:{w}} {gbps:>10.2f} {mem:>12.2f} {r['sync_vs_memcpy'] * 100:>11.0f}%  {target}")
publish = statistics.median(m["weight_publish_s"] for m in timed) * 1e3
pull = statistics.median(m["actor_sync_s"] for m in timed) * 1e3
print(f"(the GRPO run's tiny model: publish {publish:.2f} ms, an actor's sync {pull:.2f} ms per step, medians)")
print("Ratios are measured side by side on this machine; absolute figures are machine-dependent.")
if strict == "1" and not met:
    sys.exit(3)
PY
