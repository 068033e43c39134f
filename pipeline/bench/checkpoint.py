"""`mixer bench checkpoint`: how long a checkpoint holds up training on one GPU, blocking saves against background
ones (`checkpoint_async`), of the same DeepSpeed ZeRO-2 engine."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline import checkpoint
from pipeline.bench import add_model_option
from pipeline.bench.gpu import NUM_CLASSES, deepspeed_engine, engine_step, fixed, one_gpu, time_steps
from pipeline.console import add_json_option, report
from pipeline.models.mixer import MlpMixer


def run_checkpoint_bench(model: str, batch: int, saves: int, steps: int, workdir: Path) -> dict:
    """Blocking saves, then background saves. After each save `steps` training steps run (during the background
    write) before waiting for the checkpoint to be complete."""
    _, spec, images, labels = one_gpu("checkpoint", model, batch)
    engine = deepspeed_engine(MlpMixer(spec, NUM_CLASSES), batch, 2, None, {})
    step = engine_step(engine)
    _, step_ms = time_steps(step, fixed(images, labels), warmup=3, steps=steps)
    rows = []
    for mode in ("blocking", "background"):  # background second: it replaces the engine's file writer for good
        saver = checkpoint.Saver(engine, workdir / mode, rank=0, world_size=1, keep=1, background=mode == "background")
        for i in range(saves):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tag = saver.save(i + 1, {"bench": mode})
            blocked = time.perf_counter() - start
            _, during_ms = time_steps(step, fixed(images, labels), warmup=0, steps=steps)
            saver.wait()
            complete = time.perf_counter() - start
            size = sum(p.stat().st_size for p in (workdir / mode / tag).rglob("*") if p.is_file())
            rows.append(
                {
                    "mode": mode,
                    "blocked_s": blocked,
                    "complete_s": complete,
                    "step_ms_after_save": during_ms,
                    "checkpoint_gb": size / 1e9,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    background = [r["blocked_s"] for r in rows if r["mode"] == "background"]
    return {
        "device": torch.cuda.get_device_name(),
        "model": model,
        "batch": batch,
        "step_ms": step_ms,
        "rows": rows,
        "background_blocked_s": sorted(background)[len(background) // 2],
    }


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "checkpoint", help="training time lost to a checkpoint, blocking vs background", description=command.__doc__
    )
    add_model_option(parser, "B/16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--saves", type=int, default=3, help="checkpoints per mode")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed after each save")
    parser.add_argument("--workdir", default="runs/bench-checkpoint", help="where the checkpoints are written")
    add_json_option(parser)
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """How long a checkpoint holds up training on one GPU: blocking vs background (`checkpoint_async`) saves."""
    result = run_checkpoint_bench(args.model, args.batch, args.saves, args.steps, Path(args.workdir))
    rows = [
        [r["mode"], f"{r['blocked_s']:.3f}", f"{r['complete_s']:.2f}", f"{r['step_ms_after_save']:.0f}",
         f"{r['checkpoint_gb']:.2f}"]
        for r in result["rows"]
    ]  # fmt: skip
    title = f"Mixer-{args.model} DeepSpeed ZeRO-2 checkpoints, {result['device']}, step {result['step_ms']:.0f} ms"
    columns = ("mode", "training blocked s", "complete after s", "step ms while writing", "GB")
    report(title, columns, rows, result, args.json)
    return 0
