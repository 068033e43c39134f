"""`mixer bench scale`: how training throughput grows with the number of GPUs (weak scaling, one node).

The same experiment config is run with `mixer run` (the real pipeline: shards, loader, DeepSpeed, MLflow) on
each number of ranks and ZeRO stage asked for, one node, micro-batch per rank fixed (weak scaling). Each row is read
from the first training stage's result: `train/img_per_s` of its last logged window (so start-up and compilation in
earlier windows are left out), `train/mfu` and `train/peak_mem_gib`. Scaling efficiency = images/s per rank on N
ranks ÷ images/s on 1 rank, same ZeRO stage. Where the time went, per run: the share of that window the slowest
rank's host waited for its loader (`train/data_wait_frac`) and for the other ranks (`train/sync_wait_frac`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.console import add_json_option, report
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
                    "data_wait_frac": result["train/data_wait_frac"],
                    "sync_wait_frac": result["train/sync_wait_frac"],
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


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "scale", help="images/s, MFU and memory of an experiment on 1..N ranks", description=command.__doc__
    )
    parser.add_argument("config", help="experiment YAML; its first training stage is measured")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8], help="ranks (GPUs) per run")
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], help="ZeRO stages")
    parser.add_argument("--workdir", default="runs/scale", help="each run's output_dir goes under this")
    add_json_option(parser)
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """Weak scaling of a real experiment: `mixer run CONFIG` on each number of ranks and ZeRO stage, one node."""
    result = run_scale_bench(args.config, args.overrides, args.ranks, args.zero, Path(args.workdir).resolve())
    rows = [
        [str(r["zero_stage"]), str(r["ranks"]), f"{r['images_per_s']:.0f}", f"{r['images_per_s_per_rank']:.0f}",
         f"{r['mfu']:.1%}", "-" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.1%}",
         "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}", f"{r['data_wait_frac']:.1%}",
         f"{r['sync_wait_frac']:.1%}", f"{r['wall_s']:.0f}"]
        for r in result["rows"]
    ]  # fmt: skip
    title = f"{args.config}, stage {result['stage']}, micro-batch {result['micro_batch']}, {result['device']}"
    columns = ("ZeRO", "ranks", "img/s", "img/s per rank", "MFU", "scaling eff.", "peak GiB/rank", "data wait",
               "host sync", "wall s")  # fmt: skip
    report(title, columns, rows, result, args.json)
    return 0
