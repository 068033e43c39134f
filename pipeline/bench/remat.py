"""`mixer bench remat`: the activation memory a training forward pass keeps for the backward pass, per
`model.remat` setting (eager, bf16 autocast); runs on the CPU as well as on a GPU."""

from __future__ import annotations

import argparse

import torch

from pipeline.bench import add_model_option
from pipeline.bench.gpu import NUM_CLASSES
from pipeline.console import add_json_option, report
from pipeline.models.mixer import REMAT, VARIANTS, MlpMixer, bytes_kept_for_backward


def run_remat_bench(model: str, device: str) -> dict:
    """Bytes kept per image (the difference between batches of 2 and 1) and independent of the batch (bf16 copies
    of the weights), per setting."""
    spec = VARIANTS[model]
    target = torch.device(device)
    rows = []
    for remat in REMAT:
        torch.manual_seed(0)
        mixer = MlpMixer(spec, NUM_CLASSES, remat=remat).to(target)
        kept = []
        for batch in (1, 2):
            images = torch.randn(batch, 3, spec.image_size, spec.image_size, device=target)
            with torch.autocast(target.type, dtype=torch.bfloat16):
                kept.append(bytes_kept_for_backward(mixer, images))
        per_image, fixed = kept[1] - kept[0], 2 * kept[0] - kept[1]
        rows.append({"remat": remat, "mib_per_image": per_image / 2**20, "fixed_mib": fixed / 2**20})
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu"
    return {"model": model, "device": name, "torch": torch.__version__, "rows": rows}


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("remat", help="activation memory per model.remat setting", description=command.__doc__)
    add_model_option(parser, "H/14")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_json_option(parser)
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """Activation memory kept for the backward pass per `model.remat` setting (eager, bf16 autocast)."""
    result = run_remat_bench(args.model, args.device)
    rows = [[r["remat"], f"{r['mib_per_image']:.1f}", f"{r['fixed_mib']:.0f}"] for r in result["rows"]]
    title = f"Mixer-{args.model}, kept for the backward pass, {result['device']}"
    report(title, ("model.remat", "MiB per image", "MiB per batch"), rows, result, args.json)
    return 0
