"""A PyTorch DDP training script under rtrain: the script is the user's own (torch.distributed
with the gloo backend on CPU, env:// rendezvous as torchrun gives it), and the `rtrain` helper
package reports its steps and keeps its checkpoints, so the launcher shows live progress, writes
metrics.jsonl and summary.json, finds a hung rank, and a killed rank's gang resumes from the last
checkpoint. Stopped (Ctrl-C, `rtrain stop`), every rank saves at the end of the same step and exits.

    pip install ./python torch            (or: job.env PYTHONPATH = "python", as the config does)
    rtrain launch configs/pytorch_ddp.toml

The model learns a fixed random teacher (a small MLP regression); the data of a step depends on
(seed, step, rank) only, so a resumed run sees the batches the lost one would have.
"""
import time

import rtrain
import torch
import torch.distributed as dist
import torch.nn as nn

ctx = rtrain.context()
cfg = rtrain.config()
steps = cfg.get("train", {}).get("steps", 200)
user = cfg.get("user", {})
every, batch, lr = user.get("checkpoint_every", 50), user.get("batch", 64), user.get("lr", 3e-3)
pause = user.get("pause_s", 0.0)  # tests slow the steps down to kill a rank mid-run

dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1))
ddp = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.AdamW(ddp.parameters(), lr=lr)

rtrain.stop_requested()  # from here on, the launch's SIGTERM asks for a checkpoint and a clean exit

start = 0
ckpt = rtrain.latest_checkpoint()
if ckpt is not None:
    state = torch.load(ckpt / "state.pt")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    start = state["step"]
    print(f"rank {ctx.rank}: resumed from {ckpt.name} (attempt {ctx.attempt})", flush=True)

for step in range(start + 1, steps + 1):
    began = time.monotonic()
    time.sleep(pause)
    g = torch.Generator().manual_seed(step * 1000 + ctx.rank)
    x = torch.randn(batch, 32, generator=g)
    with torch.no_grad():
        y = teacher(x)
    loss = nn.functional.mse_loss(ddp(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    # The gang's mean loss, as every rank sees it after the all-reduce.
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean /= ctx.world_size
    rtrain.report(step, loss=mean.item(), lr=lr, tokens=batch * ctx.world_size)
    if step % 20 == 0:
        print(f"rank {ctx.rank}: step {step} loss {mean.item():.4f} ({time.monotonic() - began:.3f} s)", flush=True)
    # Every rank stops after the same step once any was asked to.
    stopping = torch.tensor([float(rtrain.stop_requested())])
    dist.all_reduce(stopping)
    stopping = stopping.item() > 0
    if step % every == 0 or step == steps or stopping:
        with rtrain.save_checkpoint(step) as d:
            if d is not None:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, d / "state.pt")
        dist.barrier()  # no rank goes on before the checkpoint is published
    if stopping:
        print(f"rank {ctx.rank}: stopped on request at step {step}, checkpoint saved", flush=True)
        dist.destroy_process_group()
        raise SystemExit(0)

print(f"rank {ctx.rank}: done at step {steps}, loss {mean.item():.4f}", flush=True)
dist.destroy_process_group()
