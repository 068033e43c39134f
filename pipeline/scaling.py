"""`mixer bench scale` and `mixer bench allreduce`: how training throughput grows with the number of GPUs.

Scale: the same experiment config is run with `mixer run` (the real pipeline: shards, loader, DeepSpeed, MLflow) on
each number of ranks and ZeRO stage asked for, one node, micro-batch per rank fixed (weak scaling). Each row is read
from the first training stage's result: `train/img_per_s` of its last logged window (so start-up and compilation in
earlier windows are left out), `train/mfu` and `train/peak_mem_gib`. Scaling efficiency = images/s per rank on N
ranks ÷ images/s on 1 rank, same ZeRO stage.

All-reduce: NCCL (gloo on CPU) all-reduce of bf16 buffers through torch.distributed, the reference for what
gradient reduction can cost; bus bandwidth = bytes × 2(n-1)/n ÷ time, as nccl-tests report it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from pipeline import dist
from pipeline.config import load_config
from pipeline.layout import RunLayout


def run_scale_bench(config: str, overrides: list[str], ranks: list[int], zero_stages: list[int], workdir: Path) -> dict:
    """One `mixer run` per (ZeRO stage, ranks) under `workdir`; returns the rows and the efficiencies."""
    cfg = load_config(config, overrides)
    stage = next(s for s in cfg.stages if s.kind.trains)
    rows = []
    for zero in zero_stages:
        for n in ranks:
            out = workdir / f"zero{zero}-{n}rank"
            run_overrides = [
                *overrides,
                f"output_dir={out}",
                f"launch.nproc_per_node={n}",
                f"deepspeed.zero_stage={zero}",
            ]
            started = time.time()
            proc = subprocess.run([sys.executable, "-m", "pipeline", "run", config, *run_overrides])
            if proc.returncode != 0:
                raise RuntimeError(f"mixer run {config} on {n} ranks, ZeRO-{zero} failed ({proc.returncode})")
            result = RunLayout(out).stage(stage.name).read_result()
            rows.append(
                {
                    "zero_stage": zero,
                    "ranks": n,
                    "images_per_s": result["train/img_per_s"],
                    "images_per_s_per_rank": result["train/img_per_s"] / n,
                    "mfu": result["train/mfu"],
                    "peak_mem_gib": result.get("train/peak_mem_gib"),
                    "wall_s": round(time.time() - started, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        single = next((r for r in rows if r["zero_stage"] == row["zero_stage"] and r["ranks"] == 1), None)
        row["scaling_efficiency"] = row["images_per_s_per_rank"] / single["images_per_s"] if single else None
    return {
        "config": config,
        "overrides": overrides,
        "stage": stage.name,
        "micro_batch": stage.micro_batch,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "rows": rows,
    }


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
