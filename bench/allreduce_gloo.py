#!/usr/bin/env python3
"""PyTorch reference for `rtrain bench allreduce`: torch.distributed gloo all-reduce on loopback.

Run with: python3 bench/allreduce_gloo.py [--ranks 2] [--iters 10] [--min-mib 1] [--max-mib 256]

Spawns `--ranks` processes with torch.multiprocessing, all-reduces (sum) a float32 tensor of each
size (1 MiB .. 256 MiB, powers of 2), and prints one JSON object per size with the fields rtrain
prints: size_bytes, time_s (median over iterations of the slowest rank), algbw_gbps = size /
time / 1e9 and busbw_gbps = algbw * 2 (n - 1) / n, plus "backend": "gloo".
"""

import argparse
import json
import os
import queue as queue_mod
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP_ITERS = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, sizes: list, iters: int, threads: int, out) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Loopback on every rank, as rtrain's benchmark does.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        times = []
        for size in sizes:
            data = torch.ones(size // 4, dtype=torch.float32)
            for _ in range(WARMUP_ITERS):
                dist.all_reduce(data, op=dist.ReduceOp.SUM)
            per_iter = []
            for _ in range(iters):
                start = time.perf_counter()
                dist.all_reduce(data, op=dist.ReduceOp.SUM)
                per_iter.append(time.perf_counter() - start)
            times.append(per_iter)
        out.put((rank, times))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--min-mib", type=int, default=1)
    parser.add_argument("--max-mib", type=int, default=256)
    args = parser.parse_args()

    sizes = []
    mib = args.min_mib
    while mib <= args.max_mib:
        sizes.append(mib << 20)
        mib *= 2
    threads = max(1, (os.cpu_count() or 1) // args.ranks)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, args.ranks, port, sizes, args.iters, threads, queue))
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    per_rank = {}
    try:
        while len(per_rank) < len(procs):
            try:
                rank, times = queue.get(timeout=1.0)
                per_rank[rank] = times
            except queue_mod.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:
                    raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    n = args.ranks
    for s, size in enumerate(sizes):
        slowest = [max(per_rank[r][s][i] for r in range(n)) for i in range(args.iters)]
        time_s = statistics.median(slowest)
        algbw = size / time_s / 1e9
        print(
            json.dumps(
                {
                    "backend": "gloo",
                    "algorithm": "gloo default",
                    "ranks": n,
                    "size_bytes": size,
                    "time_s": time_s,
                    "algbw_gbps": algbw,
                    "busbw_gbps": algbw * 2 * (n - 1) / n,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
