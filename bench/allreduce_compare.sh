#!/usr/bin/env bash
# Side-by-side CPU all-reduce benchmark, 2 ranks, 64 MiB fp32 sum: rtrain's shm backend (a plain
# buffer staged through shared memory, and a shared buffer reduced in place, which is how DDP
# reduces its gradients), rtrain's tcp backend, and torch.distributed gloo.
# docs/DESIGN.md §11.1 target: bus bandwidth >= 3x gloo's, reported also as % of memcpy.
#
# Run with: bash bench/allreduce_compare.sh          (3 alternating rounds)
#           ROUNDS=5 bash bench/allreduce_compare.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS="${ROUNDS:-3}"
RTRAIN=target/release/rtrain

die() { echo "allreduce_compare: $*" >&2; exit 1; }

python3 -c "import torch" >/dev/null 2>&1 \
  || die "PyTorch is not importable by python3; install it with: pip install -r bench/requirements.txt"

echo "== building rtrain (cargo build --release; not timed)"
cargo build --release
[[ -x "$RTRAIN" ]] || die "cargo build succeeded but $RTRAIN is missing"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rtrain-allreduce-compare.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round/$ROUNDS"
  "$RTRAIN" bench allreduce --ranks 2 --backend shm --max-mib 64 --iters 10 --json >>"$WORK/rtrain.jsonl"
  "$RTRAIN" bench allreduce --ranks 2 --backend tcp --max-mib 64 --iters 10 --json >>"$WORK/rtrain.jsonl"
  python3 bench/allreduce_gloo.py --ranks 2 --min-mib 64 --max-mib 64 --iters 10 >>"$WORK/gloo.jsonl"
done

python3 - "$WORK/rtrain.jsonl" "$WORK/gloo.jsonl" <<'PY'
import json, statistics, sys

size = 64 << 20
rt = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
gl = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
med = statistics.median
gloo = med(r["busbw_gbps"] for r in gl if r["size_bytes"] == size)
memcpy = med(r["memcpy_gbps"] for r in rt)
print(f"\nall-reduce, 2 ranks, 64 MiB fp32 sum; medians of {len(gl)} alternating rounds; "
      f"memcpy {memcpy:.2f} GB/s")
print(f"{'backend':<26} {'busbw GB/s':>10} {'% memcpy':>9} {'vs gloo':>8}  target")
rows = [("gloo (torch.distributed)", gloo)]
for backend, algorithm in (("shm", "in-place"), ("shm", "staged"), ("tcp", "ring")):
    bw = [r["busbw_gbps"] for r in rt
          if r["size_bytes"] == size and r["backend"] == backend and r["algorithm"] == algorithm]
    rows.append((f"rtrain {backend} {algorithm}", med(bw)))
for name, bw in rows:
    ratio = bw / gloo
    target = "" if name.startswith("gloo") else (">= 3.00x " + ("PASS" if ratio >= 3 else "MISS"))
    print(f"{name:<26} {bw:>10.2f} {100 * bw / memcpy:>8.1f}% {ratio:>7.2f}x  {target}")
print("DDP reduces its gradient buffer in place (shm in-place); staged is any other CPU tensor.")
PY
