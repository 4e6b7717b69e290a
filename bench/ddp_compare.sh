#!/usr/bin/env bash
# Side-by-side DDP benchmark: rtrain vs PyTorch DDP (gloo) on the GPT spec, 2 CPU workers.
# Targets of docs/DESIGN.md §11.3 and §11.5, as this script judges them: tokens/s >= 1.2x
# PyTorch; launch -> first optimizer step done <= 1 s and <= 0.25x torchrun.
#
# Run with: bash bench/ddp_compare.sh            (20 steps, 3 alternating rounds)
#           STEPS=50 ROUNDS=5 bash bench/ddp_compare.sh   (or: bash bench/ddp_compare.sh 50)
# STRICT=1 makes a missed target exit with status 3.
#
# LINK_RATE=500mbit puts a network between the workers: both frameworks run inside a network
# namespace of their own whose loopback carries LINK_RATE (tc tbf), and both all-reduce over TCP
# (rtrain with train.backend = "tcp", PyTorch with gloo), so the gradient all-reduce costs about
# what backward does and hiding it behind backward (both overlap) shows. Needs root and iproute2.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS="${1:-${STEPS:-20}}"
ROUNDS="${ROUNDS:-3}"
STRICT="${STRICT:-0}"
LINK_RATE="${LINK_RATE:-}"
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
IN_NS=()
RTRAIN_SET=()
NETNS=""
cleanup() {
  rm -rf "$WORK"
  if [[ -n "$NETNS" ]]; then ip netns del "$NETNS" 2>/dev/null || true; fi
}
trap cleanup EXIT
if [[ -n "$LINK_RATE" ]]; then
  [[ "$(id -u)" -eq 0 ]] || die "LINK_RATE needs root (to make a network namespace)"
  command -v ip >/dev/null && command -v tc >/dev/null || die "LINK_RATE needs iproute2 (ip, tc)"
  NETNS="rtrain-ddp-$$"
  ip netns add "$NETNS"
  ip -n "$NETNS" link set lo up
  ip netns exec "$NETNS" tc qdisc add dev lo root tbf rate "$LINK_RATE" burst 256kb latency 50ms \
    || die "tc could not limit the namespace's loopback to '$LINK_RATE'"
  IN_NS=(ip netns exec "$NETNS")
  RTRAIN_SET=(--set train.backend=tcp)
  echo "== both frameworks in network namespace $NETNS, loopback limited to $LINK_RATE, all-reduce over TCP"
fi

# Rounds alternate rtrain and PyTorch, so load that comes and goes on a shared machine falls on
# both; the report takes medians over rounds.
for round in $(seq 1 "$ROUNDS"); do
  RUN_DIR="$WORK/runs-$round"
  echo "== round $round/$ROUNDS rtrain: $RTRAIN launch $CONFIG (steps=$STEPS)"
  T0=$(date +%s.%N)
  if ! "${IN_NS[@]}" "$RTRAIN" launch "$CONFIG" --set "train.steps=$STEPS" --set "job.run_dir=$RUN_DIR" \
      "${RTRAIN_SET[@]}" >"$WORK/rtrain-$round.log" 2>&1; then
    tail -n 40 "$WORK/rtrain-$round.log" >&2
    die "rtrain launch failed (log tail above)"
  fi
  [[ -f "$RUN_DIR/$JOB_NAME/summary.json" ]] || die "rtrain wrote no summary.json"
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); s["t0"]=float(sys.argv[2]); print(json.dumps(s))' \
    "$RUN_DIR/$JOB_NAME/summary.json" "$T0" >>"$WORK/rtrain.jsonl"

  echo "== round $round/$ROUNDS pytorch: ${TORCHRUN[*]} --nproc-per-node 2 bench/pytorch_ddp.py --steps $STEPS"
  T0=$(date +%s.%N)
  if ! "${IN_NS[@]}" "${TORCHRUN[@]}" --nproc-per-node 2 bench/pytorch_ddp.py --steps "$STEPS" \
      >"$WORK/torch-$round.log" 2>&1; then
    grep -m 20 -E 'Error|error' "$WORK/torch-$round.log" >&2 || tail -n 40 "$WORK/torch-$round.log" >&2
    die "torchrun failed (log lines above)"
  fi
  LINE="$(grep -m1 '^{"framework": "pytorch-ddp"' "$WORK/torch-$round.log" || true)"
  [[ -n "$LINE" ]] || die "no result line from pytorch_ddp.py"
  python3 -c 'import json,sys; s=json.loads(sys.argv[1]); s["t0"]=float(sys.argv[2]); print(json.dumps(s))' \
    "$LINE" "$T0" >>"$WORK/torch.jsonl"
done

# ---- report -----------------------------------------------------------------------------------
python3 - "$WORK/rtrain.jsonl" "$WORK/torch.jsonl" "$STEPS" "$STRICT" "$LINK_RATE" <<'PY'
import json, statistics, sys

rt_path, pt_path, steps, strict, link = sys.argv[1:]
rts = [json.loads(l) for l in open(rt_path)]
pts = [json.loads(l) for l in open(pt_path)]
med = statistics.median

tok_r = [float(r["tokens_per_s"]) for r in rts]
tok_t = [float(p["tokens_per_s"]) for p in pts]
first_r = [float(r["first_step_done_unix"]) - r["t0"] for r in rts]
first_t = [float(p["first_step_done_unix"]) - p["t0"] for p in pts]
tok_ratio = med(tok_r) / med(tok_t)
first_ratio = med(first_r) / med(first_t)

def verdict(ok):
    return "PASS" if ok else "MISS"

rows = [
    ("tokens/s (global)", f"{med(tok_r):,.0f}", f"{med(tok_t):,.0f}",
     f"{tok_ratio:.2f}x", ">= 1.20x", verdict(tok_ratio >= 1.2)),
    ("launch -> first step (s)", f"{med(first_r):.3f}", f"{med(first_t):.3f}",
     f"{first_ratio:.2f}x", "<= 0.25x", verdict(first_ratio <= 0.25)),
    ("launch -> first step, abs", f"{med(first_r):.3f}", "", "", "<= 1.000 s", verdict(med(first_r) <= 1.0)),
]
print()
where = f", workers joined by a {link} link (all-reduce over TCP)" if link else ""
print(f"DDP GPT benchmark, 2 CPU workers{where}, {steps} steps, medians of {len(rts)} alternating rounds "
      "(tokens/s over the steps after the first)")
hdr = ("metric", "rtrain", "pytorch-ddp", "rtrain/pt", "target", "")
widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                          for i, (c, w) in enumerate(zip(r, widths)))
print(fmt(hdr))
print("  ".join("-" * w for w in widths))
for r in rows:
    print(fmt(r))
print("\nper round tokens/s (rtrain / pytorch): "
      + ", ".join(f"{a:,.0f} / {b:,.0f}" for a, b in zip(tok_r, tok_t)))
st = rts[-1].get("startup") or {}
if st:
    parts = ", ".join(f"{k.removesuffix('_s')} {float(st[k]):.3f}s"
                      for k in ("schedule_s", "spawn_s", "rendezvous_s", "first_step_s") if st.get(k) is not None)
    print(f"rtrain startup (last round): {parts}")
print(f"pytorch: threads/worker {pts[-1].get('threads')}, torch {pts[-1].get('torch')}")
print("Ratios are measured side by side on this machine; absolute figures are machine-dependent.")

missed = not (tok_ratio >= 1.2 and first_ratio <= 0.25 and med(first_r) <= 1.0)
if missed and strict == "1":
    sys.exit(3)
PY
