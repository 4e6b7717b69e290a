"""PyTorch DDP reference for the rtrain GPT benchmark spec (docs/DESIGN.md §11).

Run with: torchrun --nproc-per-node 2 bench/pytorch_ddp.py --steps 20
          (add --device cuda for one GPU per worker, DDP over nccl; --precision bf16 for the
          forward pass under bf16 autocast, as rtrain's train.precision = "bf16")

GPT-2 block (pre-LayerNorm, fused QKV, causal SDPA, tanh-GELU MLP 4x), n_layer 4, n_head 4,
n_embd 256, context 128, byte vocabulary 256, no dropout, fp32, AdamW lr 3e-4 (betas 0.9/0.95,
weight decay 0.1 on >=2-D params), grad clip 1.0, micro-batch 16 per worker, random byte data,
DistributedDataParallel on gloo. Rank 0 prints one JSON line at the end; bench/ddp_compare.sh
reads it next to rtrain's summary.json.
"""

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

N_LAYER = 4
N_HEAD = 4
N_EMBD = 256
BLOCK_SIZE = 128
VOCAB = 256
MICRO_BATCH = 16
LR = 3e-4
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
WARMUP_STEPS = 2  # steps excluded from the throughput window


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q = q.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
        k = k.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
        v = v.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD)
        self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(N_EMBD)
        self.mlp = Mlp()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, N_EMBD)
        self.wpe = nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def make_optimizer(model):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


def default_threads(local_world):
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per worker (default: cores // local world size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: one GPU per worker (LOCAL_RANK), DDP over nccl instead of gloo")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: forward and loss under torch.autocast(dtype=torch.bfloat16)")
    parser.add_argument("--bucket-cap-mb", type=float, default=None,
                        help="DDP's bucket_cap_mb (default: PyTorch's, 25 MB after a first bucket of 1 MB)")
    parser.add_argument("--tf32", choices=("on", "off"), default="on",
                        help="cuda: float32 matmuls on TF32 tensor cores (rtrain's train.tf32 default)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # torchrun sets OMP_NUM_THREADS=1; match rtrain's default of cores / local workers instead.
    torch.set_num_threads(args.threads or default_threads(local_world))

    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    buckets = {} if args.bucket_cap_mb is None else {"bucket_cap_mb": args.bucket_cap_mb}
    model = DDP(Gpt().to(device), device_ids=[device.index] if cuda else None, **buckets)
    optimizer = make_optimizer(model)
    data_gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own shard

    first_step_done_unix = None
    window_start = None
    window_steps = 0
    warmup = min(WARMUP_STEPS, args.steps - 1)  # keep at least one measured step
    loss_value = float("nan")
    for step in range(args.steps):
        if step == warmup:
            window_start = time.perf_counter()
        # Random bytes: one sequence of context+1 per sample, shifted for next-byte targets.
        seq = torch.randint(0, VOCAB, (MICRO_BATCH, BLOCK_SIZE + 1), generator=data_gen)
        x, y = seq[:, :-1].to(device), seq[:, 1:].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) gradient buckets here
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)  # the step is done when its kernels are
        if first_step_done_unix is None:
            first_step_done_unix = time.time()
        if step >= warmup:
            window_steps += 1
        if step == args.steps - 1:
            loss_value = loss.item()
    elapsed = time.perf_counter() - window_start

    tokens_per_step = world * MICRO_BATCH * BLOCK_SIZE
    if rank == 0:
        print(json.dumps({
            "framework": "pytorch-ddp",
            "device": args.device,
            "precision": args.precision,
            "tf32": cuda and args.tf32 == "on",
            "workers": world,
            "steps": args.steps,
            "tokens_per_s": tokens_per_step * window_steps / elapsed,
            "first_step_done_unix": first_step_done_unix,
            "step_time_s": elapsed / window_steps,
            "final_loss": loss_value,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
