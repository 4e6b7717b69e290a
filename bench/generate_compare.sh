#!/usr/bin/env bash
# Side-by-side generation benchmark: rtrain vs transformers `generate`, greedy, on the same
# randomly initialised Llama (bench/make_bench_llama.py) on CPU, batch 1 and batch 32, 16-token
# prompts and 64 new tokens each (all sequences forced to full length). Medians of ROUNDS
# alternating rounds; each round reports the best of 3 timed runs per side.
#
#   bash bench/generate_compare.sh            (ROUNDS=3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-3}"
die() { echo "generate_compare: $*" >&2; exit 1; }
python3 -c "import torch, transformers" >/dev/null 2>&1 \
  || die "needs torch and transformers: pip install -r bench/requirements.txt"

echo "== building rtrain (cargo build --release; not timed)"
cargo build --release
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rtrain-generate.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
python3 bench/make_bench_llama.py "$WORK/model" >/dev/null

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round/$ROUNDS"
  target/release/rtrain bench generate --model "$WORK/model" --batch 1,32 --json >>"$WORK/results.jsonl"
  for b in 1 32; do
    python3 bench/hf_generate.py --model "$WORK/model" --batch "$b" 2>/dev/null | grep '^{' >>"$WORK/results.jsonl"
  done
done

python3 - "$WORK/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\ngreedy generation on CPU, Llama hidden 256 x 4 layers (GQA 8/4 heads), 16-token prompts, "
      "64 new tokens; medians over rounds")
print(f"{'batch':>5}  {'rtrain tok/s':>12}  {'transformers tok/s':>18}  {'ratio':>6}")
for b in (1, 32):
    r = statistics.median(x["tokens_per_s"] for x in rows if x["framework"] == "rtrain" and x["batch"] == b)
    t = statistics.median(x["tokens_per_s"] for x in rows if x["framework"] == "transformers" and x["batch"] == b)
    print(f"{b:>5}  {r:>12,.0f}  {t:>18,.0f}  {r / t:>5.2f}x")
print("Ratios are measured side by side on this machine; absolute figures are machine-dependent.")
PY
