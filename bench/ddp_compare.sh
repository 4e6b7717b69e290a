#!/usr/bin/env bash
# Side-by-side DDP benchmark: rtrain vs PyTorch DDP (gloo) on the GPT spec, 2 CPU workers.
# DESIGN.md section 11 targets: tokens/s >= 1.2x PyTorch; launch -> first optimizer step done
# <= 1 s and <= 0.25x torchrun.
#
# Run with: bash bench/ddp_compare.sh            (20 steps)
#           STEPS=50 bash bench/ddp_compare.sh   (or: bash bench/ddp_compare.sh 50)
# STRICT=1 makes a missed target exit with status 3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS="${1:-${STEPS:-20}}"
STRICT="${STRICT:-0}"
CONFIG=configs/bench/ddp_gpt.toml
JOB_NAME=ddp_gpt
RTRAIN=target/release/rtrain

die() { echo "ddp_compare: $*" >&2; exit 1; }

[[ "$STEPS" =~ ^[0-9]+$ ]] && (( STEPS >= 3 )) \
  || die "STEPS must be an integer >= 3 (2 warm-up steps are excluded from tokens/s), got '$STEPS'"

if ! python3 -c "import torch" >/dev/null 2>&1; then
  die "PyTorch is not importable by python3; install it with: pip install -r bench/requirements.txt"
fi
[[ -f "$CONFIG" ]] || die "missing $CONFIG"

if command -v torchrun >/dev/null 2>&1; then
  TORCHRUN=(torchrun)
else
  TORCHRUN=(python3 -m torch.distributed.run)
fi

echo "== building rtrain (cargo build --release; not timed)"
cargo build --release
[[ -x "$RTRAIN" ]] || die "cargo build succeeded but $RTRAIN is missing"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rtrain-ddp-compare.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
RUN_DIR="$WORK/runs"

# ---- (a) rtrain -------------------------------------------------------------------------------
echo "== rtrain: $RTRAIN launch $CONFIG (steps=$STEPS)"
T0_RTRAIN=$(date +%s.%N)
if ! "$RTRAIN" launch "$CONFIG" --set "train.steps=$STEPS" --set "job.run_dir=$RUN_DIR" \
    >"$WORK/rtrain.log" 2>&1; then
  tail -n 40 "$WORK/rtrain.log" >&2
  die "rtrain launch failed (log tail above)"
fi
SUMMARY="$RUN_DIR/$JOB_NAME/summary.json"
[[ -f "$SUMMARY" ]] || { tail -n 40 "$WORK/rtrain.log" >&2; die "rtrain wrote no $SUMMARY"; }

# ---- (b) PyTorch DDP --------------------------------------------------------------------------
echo "== pytorch: ${TORCHRUN[*]} --nproc-per-node 2 bench/pytorch_ddp.py --steps $STEPS"
T0_TORCH=$(date +%s.%N)
if ! "${TORCHRUN[@]}" --nproc-per-node 2 bench/pytorch_ddp.py --steps "$STEPS" \
    >"$WORK/torch.log" 2>&1; then
  tail -n 40 "$WORK/torch.log" >&2
  die "torchrun failed (log tail above)"
fi
TORCH_JSON="$(grep -m1 '^{"framework": "pytorch-ddp"' "$WORK/torch.log" || true)"
[[ -n "$TORCH_JSON" ]] || { tail -n 40 "$WORK/torch.log" >&2; die "no result line from pytorch_ddp.py"; }
echo "$TORCH_JSON" >"$WORK/torch.json"

# ---- report -----------------------------------------------------------------------------------
python3 - "$SUMMARY" "$RUN_DIR/$JOB_NAME/metrics.jsonl" "$WORK/torch.json" \
  "$T0_RTRAIN" "$T0_TORCH" "$STEPS" "$STRICT" <<'PY'
import json, os, sys

summary_path, metrics_path, torch_path, t0_r, t0_t, steps, strict = sys.argv[1:]
t0_r, t0_t = float(t0_r), float(t0_t)
rt = json.load(open(summary_path))
pt = json.load(open(torch_path))

first_done_r = rt.get("first_step_done_unix")
if first_done_r is None and os.path.exists(metrics_path):
    # Fall back to the time the first logged step finished.
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                first_done_r = json.loads(line)["time"]
                break
if first_done_r is None:
    sys.exit("ddp_compare: rtrain summary has no first_step_done_unix and metrics.jsonl is empty")

tok_r, tok_t = float(rt["tokens_per_s"]), float(pt["tokens_per_s"])
first_r = float(first_done_r) - t0_r
first_t = float(pt["first_step_done_unix"]) - t0_t
tok_ratio = tok_r / tok_t
first_ratio = first_r / first_t

def verdict(ok):
    return "PASS" if ok else "MISS"

rows = [
    ("tokens/s (global)", f"{tok_r:,.0f}", f"{tok_t:,.0f}",
     f"{tok_ratio:.2f}x", ">= 1.20x", verdict(tok_ratio >= 1.2)),
    ("launch -> first step (s)", f"{first_r:.3f}", f"{first_t:.3f}",
     f"{first_ratio:.2f}x", "<= 0.25x", verdict(first_ratio <= 0.25)),
    ("launch -> first step, abs", f"{first_r:.3f}", "", "", "<= 1.000 s", verdict(first_r <= 1.0)),
]
print()
print(f"DDP GPT benchmark, 2 CPU workers, {steps} steps (tokens/s over steps after the first 2)")
hdr = ("metric", "rtrain", "pytorch-ddp", "rtrain/pt", "target", "")
widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                          for i, (c, w) in enumerate(zip(r, widths)))
print(fmt(hdr))
print("  ".join("-" * w for w in widths))
for r in rows:
    print(fmt(r))

st = rt.get("startup") or {}
if st:
    parts = ", ".join(f"{k.removesuffix('_s')} {float(st[k]):.3f}s"
                      for k in ("schedule_s", "spawn_s", "rendezvous_s", "first_step_s") if k in st)
    print(f"\nrtrain startup: {parts}")
print(f"rtrain: final_loss {rt.get('final_loss')}, wall {rt.get('wall_time_s')} s; "
      f"pytorch: step {float(pt['step_time_s'])*1000:.1f} ms, final_loss {pt.get('final_loss')}, "
      f"threads/worker {pt.get('threads')}, torch {pt.get('torch')}")
print("Ratios are measured side by side on this machine; absolute figures are machine-dependent.")

missed = not (tok_ratio >= 1.2 and first_ratio <= 0.25 and first_r <= 1.0)
if missed and strict == "1":
    sys.exit(3)
PY
