"""Run with: rtrain launch configs/torchrun_script.toml

A worker written for torchrun, launched by rtrain unchanged. It reads the torchrun environment,
and the ranks meet at MASTER_ADDR:MASTER_PORT the way torch.distributed's env:// rendezvous
does (with torch.distributed itself when PyTorch is installed, with a plain socket otherwise).
With an output folder as its argument, each rank writes the environment it saw there as JSON.
"""

import json
import os
import socket
import sys
import time

CONTRACT = [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
    "ROLE_NAME", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
    "RTRAIN_COORDINATOR", "RTRAIN_JOB_TOKEN", "RTRAIN_ROLE", "RTRAIN_ATTEMPT", "OMP_NUM_THREADS",
]


def meet_with_sockets(rank, world, addr, port):
    """Rank 0 listens on MASTER_PORT; every other rank connects and says hello."""
    if rank == 0:
        with socket.create_server((addr, port)) as server:
            server.settimeout(30)
            seen = set()
            while len(seen) < world - 1:
                conn, _ = server.accept()
                with conn:
                    seen.add(int(conn.recv(16).decode()))
            return sorted(seen)
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5) as conn:
                conn.sendall(str(rank).encode())
                return []
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def main():
    env = {k: os.environ.get(k) for k in CONTRACT}
    missing = [k for k, v in env.items() if v is None]
    if missing:
        sys.exit(f"torchrun environment incomplete: {missing}")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    try:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        met = {"backend": "gloo", "sum": t.item()}
        dist.destroy_process_group()
    except ImportError:
        met = {"backend": "socket", "peers": meet_with_sockets(rank, world, env["MASTER_ADDR"], int(env["MASTER_PORT"]))}
    print(f"rank {rank}/{world}: met the gang via {met['backend']}", flush=True)
    if len(sys.argv) > 1:
        with open(os.path.join(sys.argv[1], f"env-rank{rank}.json"), "w") as f:
            json.dump({"env": env, "met": met}, f)


if __name__ == "__main__":
    main()
