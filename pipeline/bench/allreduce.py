"""`mixer bench allreduce`: NCCL (gloo on CPU) all-reduce of bf16 buffers through torch.distributed, the reference
for what gradient reduction can cost; bus bandwidth = bytes × 2(n-1)/n ÷ time, as nccl-tests report it."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torch.distributed as torch_dist

from pipeline import dist
from pipeline.console import add_json_option, report


def run_allreduce_bench(sizes_mib: list[float], iters: int) -> list[dict] | None:
    """In every rank of a launcher's job: timed all-reduces of each size; rank 0 returns the rows."""
    env = dist.read_env()
    dist.init_process_group(env)
    n = env.world_size
    rows = []
    for mib in sizes_mib:
        dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32  # gloo reduces no bf16
        buffer = torch.ones(int(mib * 2**20) // dtype.itemsize, dtype=dtype, device=env.device)
        for _ in range(3):
            torch_dist.all_reduce(buffer)
        _sync(env.device)
        start = time.perf_counter()
        for _ in range(iters):
            torch_dist.all_reduce(buffer)
        _sync(env.device)
        seconds = (time.perf_counter() - start) / iters
        size = buffer.numel() * buffer.element_size()
        rows.append(
            {
                "ranks": n,
                "size_mib": mib,
                "time_ms": seconds * 1000,
                "algbw_gb_s": size / seconds / 1e9,
                "busbw_gb_s": size * 2 * (n - 1) / n / seconds / 1e9,
            }
        )
    dist.destroy()
    return rows if env.is_primary else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("allreduce", help="all-reduce bus bandwidth over N ranks", description=command.__doc__)
    parser.add_argument("--ranks", type=int, default=2, help="ranks (GPUs) on this node")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 16, 256, 1024], help="buffer sizes, MiB")
    parser.add_argument("--iters", type=int, default=20, help="timed all-reduces per size")
    add_json_option(parser)
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """All-reduce bus bandwidth through torch.distributed (NCCL on GPUs), the reference for communication cost."""
    if dist.read_env("cpu").world_size == 1 and args.ranks > 1:  # not inside a launcher yet: start one
        forwarded = [a for a in sys.argv[1:] if a != "--local_rank"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks)]
        return subprocess.run([*cmd, "-m", "pipeline", *forwarded]).returncode
    rows = run_allreduce_bench(args.sizes, args.iters)
    if rows is None:  # not the primary rank
        return 0
    table_rows = [
        [f"{r['size_mib']:g}", f"{r['time_ms']:.3f}", f"{r['algbw_gb_s']:.1f}", f"{r['busbw_gb_s']:.1f}"] for r in rows
    ]
    columns = ("MiB", "ms", "algbw GB/s", "busbw GB/s")
    report(f"all-reduce over {rows[0]['ranks']} ranks", columns, table_rows, {"rows": rows}, args.json)
    return 0
