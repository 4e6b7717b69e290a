#!/usr/bin/env bash
# Checks rtrain's GPU path on a machine with NVIDIA GPUs, in well under 10 minutes:
#   - the GPU, driver, torch and NCCL versions;
#   - `rtrain score` of fixture models on GPU against CPU (largest log-prob difference);
#   - a short SFT run on GPU against CPU (largest per-step loss difference);
#   - resume on GPU (a run stopped at step 10 and resumed matches an uninterrupted one);
#   - GPT demo tokens/s on GPU, rtrain and PyTorch DDP (nccl) side by side, on the same spec, in
#     float32 with TF32 matmuls (both defaults) and in bf16 autocast;
#   - bf16 autocast training on GPU against float32 (per-step loss difference);
#   - GRPO with its rollout actor on the trainer's GPU (`rl.colocate`), and with 2 or more GPUs on
#     a GPU of its own: the actor's and the trainer's log-probs of the same tokens must agree;
#   - with 2 or more GPUs: DDP over NCCL against CPU (the gradient all-reduce overlapping backward,
#     NCCL on a stream of its own: a wrong order of the two shows as a loss difference), placement
#     under a restricted CUDA_VISIBLE_DEVICES, and `rtrain bench allreduce --backend nccl`.
# It exits non-zero, naming each failed check, when any fails.
#
# No Rust toolchain is needed here: build on another machine with
#   cargo build --release --features nccl
# and copy the repository with target/release/{rtrain,rtrain-worker}. PyTorch 2.11.0 with CUDA
# 13.0 (2.11.0+cu130, the build tch 0.24 binds) must be importable by python3; if it is not:
#   pip install torch==2.11.0
# Its torch/lib and NVIDIA wheel folders are put on LD_LIBRARY_PATH for the binaries.
#
# Run with: bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RTRAIN=${RTRAIN:-target/release/rtrain}
WORKER="$(dirname "$RTRAIN")/rtrain-worker"
SFT=configs/sft_demo.toml
GPT=configs/bench/ddp_gpt.toml
FIXTURES=trainer/tests/fixtures/hf
LOSS_TOL=${LOSS_TOL:-1e-2}   # GPU vs CPU float32 losses (TF32 off), over a short run
BF16_TOL=${BF16_TOL:-5e-2}   # bf16 autocast vs float32 losses on GPU, over a short run
LOGPROB_TOL=${LOGPROB_TOL:-1e-3}

die() { echo "gpu-check: $*" >&2; exit 1; }
FAILED=()
# check NAME CMD...: runs one check, records its failure and goes on with the others.
check() {
  local name=$1
  shift
  echo
  echo "== $name"
  if "$@"; then
    echo "-- ok: $name"
  else
    echo "-- FAILED: $name" >&2
    FAILED+=("$name")
  fi
}

# ---- prerequisites ------------------------------------------------------------------------------
[[ -x "$RTRAIN" && -x "$WORKER" ]] \
  || die "$RTRAIN and $WORKER are missing: build with 'cargo build --release --features nccl' and copy target/release here"
python3 -c 'import torch' 2>/dev/null \
  || die "python3 cannot import torch; install PyTorch 2.11.0+cu130 with: pip install torch==2.11.0"
python3 - <<'PY' || die "PyTorch 2.11.0 with CUDA 13 is needed (pip install torch==2.11.0)"
import sys, torch
ok = torch.__version__.startswith("2.11.") and (torch.version.cuda or "").startswith("13.")
if not ok:
    print(f"found torch {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
sys.exit(0 if ok else 1)
PY
command -v nvidia-smi >/dev/null || die "nvidia-smi is missing: is the NVIDIA driver installed?"

SITE=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
TORCH_LIB="$SITE/torch/lib"
# The binaries were linked against the build machine's libtorch; here they use PyTorch's, with
# the NVIDIA wheels' libraries (cudart, cupti, nccl, ...) it depends on.
NV_LIBS=$(find "$SITE/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | sort | paste -sd: -)
export LD_LIBRARY_PATH="$TORCH_LIB${NV_LIBS:+:$NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
(( NGPU >= 1 )) || die "PyTorch sees no CUDA device (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>})"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rtrain-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== versions"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "NCCL", ".".join(map(str, torch.cuda.nccl.version())))'
echo "rtrain $("$RTRAIN" --version), GPUs visible: $NGPU"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ---- helpers --------------------------------------------------------------------------------------
# launch NAME ARGS...: rtrain launch with the log in $WORK/NAME.log, shown when it fails.
launch() {
  local name=$1
  shift
  if ! "$RTRAIN" launch "$@" >"$WORK/$name.log" 2>&1; then
    tail -n 40 "$WORK/$name.log" >&2
    echo "rtrain launch $* failed (log tail above)" >&2
    return 1
  fi
}

# compare_losses A.jsonl B.jsonl TOL [FIRST_STEP]: per-step loss difference of two metrics files.
compare_losses() {
  python3 - "$@" <<'PY'
import json, sys
a_path, b_path, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
first = int(sys.argv[4]) if len(sys.argv) > 4 else 1
def losses(path):
    out = {}
    for line in open(path):
        m = json.loads(line)
        if m.get("step") is not None and m.get("loss") is not None:
            out[int(m["step"])] = float(m["loss"])  # a resumed run's later attempt overwrites
    return out
a, b = losses(a_path), losses(b_path)
steps = sorted(s for s in a if s in b and s >= first)
if not steps:
    sys.exit(f"no common steps >= {first} in {a_path} and {b_path}")
diffs = [abs(a[s] - b[s]) for s in steps]
worst = max(range(len(steps)), key=diffs.__getitem__)
print(f"steps {steps[0]}..{steps[-1]}: max |loss difference| {diffs[worst]:.3g} at step {steps[worst]} "
      f"({a[steps[worst]]:.6f} vs {b[steps[worst]]:.6f}), tolerance {tol:g}")
sys.exit(0 if diffs[worst] <= tol else 1)
PY
}

# ---- checks ---------------------------------------------------------------------------------------
score_gpu_vs_cpu() {
  local model text="The quick brown fox jumps over the lazy dog. 12 + 30 = 42"
  for model in llama_tiny qwen2_tiny gpt2_tiny; do
    "$RTRAIN" score --model "$FIXTURES/$model" --text "$text" --json >"$WORK/score-$model-cpu.jsonl" || return 1
    "$RTRAIN" score --model "$FIXTURES/$model" --text "$text" --json --cuda 0 >"$WORK/score-$model-gpu.jsonl" || return 1
    python3 - "$WORK/score-$model-cpu.jsonl" "$WORK/score-$model-gpu.jsonl" "$LOGPROB_TOL" "$model" <<'PY' || return 1
import json, sys
cpu, gpu = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
tol, model = float(sys.argv[3]), sys.argv[4]
assert [c["token_id"] for c in cpu] == [g["token_id"] for g in gpu], "the token ids differ"
diff = max(abs(c["logprob"] - g["logprob"]) for c, g in zip(cpu, gpu) if c["logprob"] is not None)
print(f"{model}: {len(cpu)} tokens, max |log-prob difference| GPU vs CPU {diff:.3g} (tolerance {tol:g})")
sys.exit(0 if diff <= tol else 1)
PY
  done
}

sft_gpu_vs_cpu() {
  local common=(--set train.workers=1 --set train.steps=20 --set checkpoint.every=10)
  launch sft-cpu "$SFT" "${common[@]}" --set "job.run_dir=$WORK/sft-cpu" --set train.device=cpu || return 1
  launch sft-gpu "$SFT" "${common[@]}" --set "job.run_dir=$WORK/sft-gpu" --set train.device=cuda \
    --set train.tf32=false || return 1
  compare_losses "$WORK/sft-cpu/sft_demo/metrics.jsonl" "$WORK/sft-gpu/sft_demo/metrics.jsonl" "$LOSS_TOL"
}

bf16_vs_fp32_on_gpu() {
  local common=(--set train.workers=1 --set train.steps=20 --set train.device=cuda)
  launch sft-gpu-bf16 "$SFT" "${common[@]}" --set "job.run_dir=$WORK/sft-gpu-bf16" --set train.precision=bf16 || return 1
  launch sft-gpu-fp32 "$SFT" "${common[@]}" --set "job.run_dir=$WORK/sft-gpu-fp32" --set train.tf32=false || return 1
  compare_losses "$WORK/sft-gpu-fp32/sft_demo/metrics.jsonl" "$WORK/sft-gpu-bf16/sft_demo/metrics.jsonl" "$BF16_TOL"
}

resume_on_gpu() {
  # A constant learning rate (no warm-up, cosine floor = lr), so a run of 10 steps and one of
  # 20 share their first 10 steps, and the second half of a resumed run must match.
  local common=(--set train.workers=1 --set train.device=cuda --set train.warmup_steps=0 --set train.min_lr=3e-3
    --set checkpoint.every=5)
  launch resume-ref "$SFT" "${common[@]}" --set train.steps=20 --set "job.run_dir=$WORK/resume-ref" || return 1
  launch resume-a "$SFT" "${common[@]}" --set train.steps=10 --set "job.run_dir=$WORK/resume" || return 1
  launch resume-b "$SFT" "${common[@]}" --set train.steps=20 --set "job.run_dir=$WORK/resume" || return 1
  grep -q "resuming from .*step 10" "$WORK/resume-b.log" \
    || { echo "the second launch did not resume from step 10:" >&2; tail -n 20 "$WORK/resume-b.log" >&2; return 1; }
  # GPU kernels may sum in another order from run to run: the tolerance is small but not zero.
  compare_losses "$WORK/resume-ref/sft_demo/metrics.jsonl" "$WORK/resume/sft_demo/metrics.jsonl" 1e-4 11
}

# tokens_per_s SUMMARY.json
tokens_per_s() { python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["tokens_per_s"]))' "$1"; }

# gpt_tokens_per_s WORKERS PRECISION: the GPT spec's tokens/s, rtrain and PyTorch DDP, both with
# TF32 matmuls (their defaults here) and the forward pass in PRECISION (fp32 or bf16).
gpt_tokens_per_s() {
  local workers=$1 precision=$2 steps=30 line ours theirs name="$1-$2"
  launch "gpt-gpu-$name" "$GPT" --set "train.workers=$workers" --set train.device=cuda --set train.backend=auto \
    --set "train.precision=$precision" --set "train.steps=$steps" --set "job.run_dir=$WORK/gpt-$name" || return 1
  python3 -m torch.distributed.run --standalone --nproc-per-node "$workers" bench/pytorch_ddp.py \
    --steps "$steps" --device cuda --precision "$precision" >"$WORK/torch-$name.log" 2>&1 \
    || { tail -n 40 "$WORK/torch-$name.log" >&2; return 1; }
  line=$(grep -m1 '^{"framework": "pytorch-ddp"' "$WORK/torch-$name.log") || { echo "no result from pytorch_ddp.py" >&2; return 1; }
  ours=$(tokens_per_s "$WORK/gpt-$name/ddp_gpt/summary.json") || return 1
  theirs=$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["tokens_per_s"]))' "$line") || return 1
  printf 'GPT spec (%s), %d GPU worker(s), %s, %d steps: rtrain %s tokens/s, PyTorch DDP (nccl) %s tokens/s (%.2fx)\n' \
    "$GPT" "$workers" "$precision" "$steps" "$ours" "$theirs" "$(python3 -c "print($ours / $theirs)")"
}

ddp_nccl_vs_cpu() {
  local common=(--set train.workers=2 --set train.steps=20 --set train.micro_batch=4)
  launch ddp-cpu configs/gpt_demo.toml "${common[@]}" --set "job.run_dir=$WORK/ddp-cpu" --set train.device=cpu || return 1
  launch ddp-gpu configs/gpt_demo.toml "${common[@]}" --set "job.run_dir=$WORK/ddp-gpu" --set train.device=cuda \
    --set train.tf32=false || return 1
  compare_losses "$WORK/ddp-cpu/gpt_demo/metrics.jsonl" "$WORK/ddp-gpu/gpt_demo/metrics.jsonl" "$LOSS_TOL"
}

placement_under_visible_devices() {
  # The last two GPUs, listed in reverse: rank r must run on the r-th listed one.
  local first=$((NGPU - 1)) second=$((NGPU - 2)) allowed seen pid
  allowed=$(nvidia-smi --query-gpu=index,uuid --format=csv,noheader \
    | awk -F', ' -v a="$first" -v b="$second" '$1 == a || $1 == b { print $2 }' | sort | paste -sd, -)
  CUDA_VISIBLE_DEVICES="$first,$second" "$RTRAIN" launch configs/gpt_demo.toml --set train.workers=2 \
    --set train.device=cuda --set train.steps=300 --set "job.run_dir=$WORK/placement" >"$WORK/placement.log" 2>&1 &
  pid=$!
  : >"$WORK/placement-seen"
  # The GPUs that rtrain-worker processes hold while the run lasts (other users' are ignored).
  while kill -0 "$pid" 2>/dev/null; do
    nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader 2>/dev/null \
      | while IFS=', ' read -r app uuid; do
          [[ "$(cat "/proc/$app/comm" 2>/dev/null)" == rtrain-worker ]] && echo "$uuid"
        done >>"$WORK/placement-seen" || true
    sleep 0.5
  done
  wait "$pid" || { tail -n 40 "$WORK/placement.log" >&2; return 1; }
  seen=$(sort -u "$WORK/placement-seen" | paste -sd, -)
  echo "CUDA_VISIBLE_DEVICES=$first,$second: allowed GPUs $allowed; GPUs with compute processes during the run: ${seen:-none}"
  [[ -n "$seen" && "$seen" == "$allowed" ]]
}

# grpo_with_gpu_actors COLOCATE: a base model fine-tuned briefly on GPU, then GRPO with 1 trainer
# and 1 actor on GPU, the actor on the trainer's GPU (true) or its own (false); TF32 off so that
# both compute the policy's log-probs in full float32.
grpo_with_gpu_actors() {
  local colocate=$1 dir="$WORK/grpo-$1" gpu=(--set train.device=cuda --set train.tf32=false)
  launch "grpo-sft-$1" configs/grpo_arith_sft.toml "${gpu[@]}" --set train.steps=20 --set "job.run_dir=$dir" || return 1
  launch "grpo-$1" configs/grpo_arith.toml "${gpu[@]}" --set "rl.colocate=$colocate" --set train.steps=4 \
    --set rl.rollout_workers=1 --set rl.prompts_per_step=4 --set rl.group_size=4 --set rl.eval_max=20 \
    --set "model.path=$dir/arith_sft/model" --set "job.run_dir=$dir" || return 1
  python3 - "$dir/grpo_arith/metrics.jsonl" <<'PY'
import json, sys
steps = [m for m in map(json.loads, open(sys.argv[1])) if m.get("role") == "trainer" and "reward_mean" in m]
gaps = [m["behaviour_gap"] for m in steps]
print(f"{len(steps)} GRPO steps with the actor on a GPU: samples {[m['samples'] for m in steps]}, "
      f"max |trainer - actor| log-prob {max(gaps):.3g} (tolerance 1e-3)")
sys.exit(0 if len(steps) == 4 and max(gaps) < 1e-3 and all(m["samples"] == 16 for m in steps) else 1)
PY
}

allreduce_nccl() {
  "$RTRAIN" bench allreduce --backend nccl --ranks "$NGPU" --max-mib 256 --iters 5
}

check "score: GPU against CPU" score_gpu_vs_cpu
check "SFT: GPU against CPU, per-step loss" sft_gpu_vs_cpu
check "resume on GPU" resume_on_gpu
check "bf16 autocast against float32 on GPU, per-step loss" bf16_vs_fp32_on_gpu
check "GRPO with its rollout actor on the trainer's GPU" grpo_with_gpu_actors true
check "GPT demo tokens/s, 1 GPU, fp32 + TF32: rtrain and PyTorch DDP" gpt_tokens_per_s 1 fp32
check "GPT demo tokens/s, 1 GPU, bf16: rtrain and PyTorch DDP" gpt_tokens_per_s 1 bf16
if (( NGPU >= 2 )); then
  check "GPT demo tokens/s, 2 GPUs, fp32 + TF32: rtrain and PyTorch DDP" gpt_tokens_per_s 2 fp32
  check "GPT demo tokens/s, 2 GPUs, bf16: rtrain and PyTorch DDP" gpt_tokens_per_s 2 bf16
  check "DDP over NCCL against CPU, 2 workers" ddp_nccl_vs_cpu
  check "placement under CUDA_VISIBLE_DEVICES" placement_under_visible_devices
  check "GRPO with its rollout actor on a GPU of its own" grpo_with_gpu_actors false
  check "bench allreduce --backend nccl, $NGPU ranks" allreduce_nccl
else
  echo
  echo "== only 1 GPU: skipping DDP over NCCL, placement, a rollout actor on a GPU of its own and the NCCL all-reduce benchmark"
fi

echo
if (( ${#FAILED[@]} > 0 )); then
  printf 'gpu-check: FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "gpu-check: all checks passed"
