"""`mixer`: parse -> build -> run -> close. Library code raises; EXIT_CODES here turns its errors into exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.table import Table

from pipeline import bench, dist, stages
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, load_config, read_header
from pipeline.console import console
from pipeline.data.index import DataError
from pipeline.stages import REQUEUE_EXIT, StageFailed, StagePreempted
from pipeline.submit import SubmitError


def cmd_run(args: argparse.Namespace) -> int:
    """Every stage of the experiment, in order, on this machine."""
    from pipeline import tracking

    cfg = load_config(args.config, args.overrides)  # fails here, before any process starts
    stages.resolve_output_dir(cfg)
    lock = stages.OutputLock(Path(cfg.output_dir), f"mixer run {args.config}")  # this run writes there alone
    if not args.dry_run:
        tracking.check_reachable(cfg.tracking)
    layout = stages.prepare(cfg, generate_data=not args.dry_run, description=read_header(args.config))
    if args.dry_run:
        return _print_plan(cfg)
    results = stages.run_experiment(cfg, layout, lock)
    table = Table(title=f"{cfg.name}: {layout.root}")
    for column in ("stage", "steps", "wall s", "train loss", "eval top1", "eval top5", "checkpoint", "MLflow run"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r["stage"],
            str(r["steps"]),
            f"{r['wall_s']:.0f}",
            _fmt(r.get("train/loss")),
            _fmt(r.get("eval/top1")),
            _fmt(r.get("eval/top5")),
            r.get("checkpoint", "-"),
            r.get("run_id") or "-",
        )
    console.print(table)
    for r in results:
        if r.get("data/bad_samples"):
            console.print(
                f"{r['stage']}: skipped {r['data/bad_samples']:.0f} unusable samples "
                f"({r['data/bad_fraction']:.2%} of those read); each is named, with its shard, in "
                f"data/bad_samples.jsonl among the artifacts of MLflow run {r.get('run_id') or '-'}"
            )
    if cfg.tracking.enabled:
        experiment = cfg.tracking.experiment or cfg.name
        start, url = tracking.runs_view(cfg.tracking, experiment)
        how = f"{start}, then open {url}" if start else f"open {url}"
        console.print(f"MLflow: {how}  (experiment {experiment!r}: its runs)")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_plan(cfg) -> int:
    """Each stage's shape, batch arithmetic and DeepSpeed JSON, as the launched ranks will see them."""
    import torch

    from pipeline import checkpoint, engine

    device = torch.device("cuda" if cfg.launch.device == "cuda" else "cpu")
    world = cfg.launch.nproc_per_node * cfg.launch.nnodes
    specs = checkpoint.stage_specs(cfg)
    for stage in cfg.stages:
        spec = specs[stage.name]
        if not stage.kind.trains:
            batch = f"eval batch {stage.eval_batch} x {world} ranks"
        else:
            accumulation = stage.accumulation(world)
            batch = (
                f"{stage.steps} steps, global batch {stage.micro_batch * accumulation * world} = "
                f"{stage.micro_batch} x {accumulation} accumulation x {world} ranks"
            )
        console.print(f"[bold]{stage.name}[/] ({stage.kind}) on {stage.dataset}, init_from {stage.init_from}: {batch}")
        console.print(
            f"  model: {spec.num_blocks} blocks, patch {spec.patch_size}, {spec.image_size}px, S={spec.num_patches}, "
            f"C={spec.hidden_dim}, D_S={spec.tokens_mlp_dim}, D_C={spec.channels_mlp_dim}"
        )
        console.print(json.dumps(engine.build_config(stage, cfg.deepspeed, world, device), indent=2), markup=False)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """One stage, in every process that a launcher (torchrun, deepspeed, accelerate, srun) started."""
    from pipeline.launch import die_with_parent
    from pipeline.preemption import Preempted, Preemption
    from pipeline.train import run_stage

    Preemption.catch()  # a stop signal from here on is a request: set-up and failure handling run to their end
    die_with_parent()  # that request also comes when the launcher dies
    cfg = load_config(args.config, args.overrides)
    try:
        run_stage(cfg, args.name, args.parent_run_id)
    except Preempted:
        return REQUEUE_EXIT  # checkpoint saved; the scheduler should run this again
    except BaseException as err:
        if args.submitted:  # a cluster job: nobody else will close the experiment's run
            stages.close_submitted_experiment(cfg, args.parent_run_id, "FAILED")
        if not isinstance(err, Exception):
            raise
        _report_rank_error(cfg, args.name, err)
        return 1
    if args.submitted and args.last:
        stages.close_submitted_experiment(cfg, args.parent_run_id, "FINISHED")
    return 0


def _report_rank_error(cfg, stage: str, err: Exception) -> None:
    """A rank's error as one line on the console, naming the rank and the stage; the traceback goes to the stage's
    `errors/rank<r>.txt` (whose first line is that line) for `mixer run` to name the first failure."""
    import traceback

    from pipeline.layout import RunLayout

    rank = dist.read_env("cpu").rank
    message = str(err).strip().replace("\n", " ")
    where = f"rank {rank}, stage {stage}, {type(err).__name__}"
    path = RunLayout(Path(cfg.output_dir)).stage(stage).error_file(rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{where}: {message}\n\n" + "".join(traceback.format_exception(err)))
        print(f"mixer: error: {message} ({where}; traceback: {path})", file=sys.stderr)
    except OSError:  # nowhere to keep the traceback: on the console, then
        print(f"mixer: error: {message} ({where})\n" + "".join(traceback.format_exception(err)), file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    """Every stage as a cluster job, each starting when the one before it finished; or the job files only."""
    from pipeline.submit import submit

    cfg = load_config(args.config, args.overrides, gpus="cluster")  # ranks sized to the cluster's nodes
    jobs = submit(cfg, args.to, read_header(args.config))
    titles = {"slurm": "submitted to Slurm", "k8s": "applied to Kubernetes", "print": "job files"}
    table = Table(title=f"{cfg.name}: {titles[args.to]}")
    for column in ("stage", "job file", "job id"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job.stage, str(job.path), job.job_id or "-")
    console.print(table)
    if not jobs:
        console.print("every stage has finished: nothing to submit")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The paper's named variants with parameter counts (without the head), from the model code itself."""
    import torch

    from pipeline.models.mixer import VARIANTS, MixerSpec, MlpMixer, count_params

    table = Table(title=f"MLP-Mixer variants at {args.image_size}x{args.image_size}")
    for column in ("name", "layers", "patch", "C", "D_S", "D_C", "S", "params (no head)"):
        table.add_column(column, justify="right")
    for name, spec in VARIANTS.items():
        spec = MixerSpec(**{**spec.__dict__, "image_size": args.image_size})
        with torch.device("meta"):  # shapes only: H/14 would need 1.7 GB of real memory
            params = count_params(MlpMixer(spec, num_classes=1000))
        table.add_row(
            name,
            str(spec.num_blocks),
            str(spec.patch_size),
            str(spec.hidden_dim),
            str(spec.tokens_mlp_dim),
            str(spec.channels_mlp_dim),
            str(spec.num_patches),
            f"{params / 1e6:.1f}M",
        )
    console.print(table)
    return 0


def cmd_shards_write(args: argparse.Namespace) -> int:
    """Images -> WebDataset tar shards + index.json, with parallel workers; rerun to resume.

    SOURCE is a folder with one sub-folder of images per class, or a CSV/JSONL manifest with `path` (or `url`),
    `label` (integer or class name) and any extra fields (kept in each sample's .json). Images that fail to decode
    are left out and listed in OUT/report.json."""
    from pipeline.data.shards import items_from_folder, items_from_manifest, write_dataset_shards

    source = Path(args.source)
    classes, items = items_from_folder(source) if source.is_dir() else items_from_manifest(source)
    index, report = write_dataset_shards(
        items,
        args.out,
        classes=classes,
        workers=args.workers,
        max_count=args.max_count,
        max_bytes=_parse_size(args.max_size),
        max_side=args.max_side,
        quality=args.quality,
    )
    console.print(
        f"wrote {index.num_samples} samples of {len(classes) or 'integer-labelled'} classes in {len(index.urls)} "
        f"shards to {Path(args.out).resolve()} ({report['resumed_shards']} already complete)"
    )
    if report["failed"]:
        console.print(f"[yellow]{len(report['failed'])} images failed to decode and were left out[/] (report.json)")
    return 0


def cmd_shards_index(args: argparse.Namespace) -> int:
    """Count the samples of existing shards (any writer; local, pipe: or fsspec URLs) and write their index."""
    from pipeline.data.sources import expand, index_shards

    urls = expand(args.shards) if "{" in args.shards or "::" in args.shards else [args.shards]
    if len(urls) == 1 and Path(urls[0]).is_dir():
        urls = sorted(str(p) for p in Path(urls[0]).glob("*.tar"))
    out = Path(args.out) if args.out else Path(urls[0]).parent / "index.json"
    classes = args.classes.split(",") if args.classes else []
    path = index_shards(urls, out, classes, progress=lambda url, n: console.print(f"{url}: {n} samples"))
    console.print(f"indexed {len(urls)} shards -> {path}")
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    """An official/big_vision .npz or a timm state dict -> our safetensors export (+ model.json), for init_from."""
    from pipeline import weights

    w = weights.read_weights(args.source)
    weights.write_export(w, args.out)
    console.print(f"{args.source} -> {args.out}: {w.spec}, {w.num_classes} classes, GELU {w.gelu}")
    return 0


def cmd_weights_export(args: argparse.Namespace) -> int:
    """Any weights file we read -> the official .npz layout (opens in vision_transformer and big_vision)."""
    from pipeline import weights

    w = weights.read_weights(args.source)
    weights.write_npz(w.state, args.out)
    console.print(f"{args.source} -> {args.out} ({len(w.state)} tensors)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """An experiment's stage runs side by side (key and differing settings, final metrics, throughput) and a PNG of
    their curves."""
    from pipeline import compare, tracking
    from pipeline.config import TrackingConfig

    uri = args.uri or tracking.tracking_uri(TrackingConfig())
    metrics = tuple(args.metrics)
    runs = compare.stage_runs(tracking.open_client(uri), args.experiment, args.stage, args.max_runs, metrics)
    if not runs:
        raise LookupError(f"experiment {args.experiment!r} has no stage runs in {uri}")
    console.print(f"[bold]{args.experiment}[/]: {len(runs)} stage runs ({uri})")
    for table in compare.tables(runs, console.width):
        console.print(table)
    png = Path(args.png or f"{args.experiment.replace('/', '_')}-compare.png")
    compare.plot(runs, metrics, png, f"{args.experiment}: {', '.join(metrics)}")
    console.print(f"curves: {png}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A sharded checkpoint -> consolidated fp32 weights (safetensors) + model.json, loadable with no DeepSpeed."""
    from pipeline import checkpoint

    exported = checkpoint.export_checkpoint(args.source, args.out)
    console.print(
        f"{args.source} -> {args.out}: {exported.spec}, {exported.num_classes} classes, GELU {exported.gelu}; "
        f"load it with pipeline.checkpoint.load_exported"
    )
    return 0


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixer",
        description="MLP-Mixer pre-training pipeline: WebDataset shards -> DeepSpeed (ZeRO) training -> MLflow.",
    )
    # The DeepSpeed launcher inserts --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run every stage of an experiment in order on this machine",
        description=cmd_run.__doc__ + " Each stage starts as a torchrun job of "
        "launch.nproc_per_node processes; a rerun skips finished stages and resumes the others.",
    )
    run.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. output_dir=/tmp/out stages.pretrain.steps=100",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print each stage's plan and DeepSpeed config without starting anything",
    )
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser(
        "stage",
        help="run one stage inside a launcher (torchrun, deepspeed, accelerate)",
        description=cmd_stage.__doc__ + " CONFIG is normally the resolved "
        "<output_dir>/config.yaml that `mixer run` writes.",
    )
    stage.add_argument("config")
    stage.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    stage.add_argument("--name", required=True, help="the stage to run")
    stage.add_argument("--parent-run-id", help="MLflow run of the experiment, for the stage's child run")
    stage.add_argument("--submitted", action="store_true", help="a `mixer submit` job: close the parent run on failure")
    stage.add_argument("--last", action="store_true", help="with --submitted: the last stage; close the parent run")
    stage.set_defaults(func=cmd_stage)

    submit = sub.add_parser(
        "submit",
        help="submit every stage as a cluster job (Slurm or Kubernetes), chained",
        description=cmd_submit.__doc__ + " Job files go to <output_dir>/jobs/; resources come from the config's "
        "`cluster:` section (per-stage overrides under cluster.stages.<name>).",
    )
    submit.add_argument("config", help="experiment YAML")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    submit.add_argument(
        "--to",
        choices=["slurm", "k8s", "print"],
        default="slurm",
        help="slurm: sbatch, chained; k8s: kubectl apply Kubeflow PyTorchJobs (needs cluster.image); print: files only",
    )
    submit.set_defaults(func=cmd_submit)

    models = sub.add_parser(
        "models", help="list the paper's Mixer variants with parameter counts", description=cmd_models.__doc__
    )
    models.add_argument("--image-size", type=int, default=224)
    models.set_defaults(func=cmd_models)

    shards = sub.add_parser("shards", help="write WebDataset shards", description="Shard tools.")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True, metavar="COMMAND")
    write = shards_sub.add_parser(
        "write", help="image folder -> tar shards + index.json", description=cmd_shards_write.__doc__
    )
    write.add_argument("source", help="folder with one sub-folder of images per class, or a .csv/.jsonl manifest")
    write.add_argument("out", help="output folder for the shards and index.json")
    write.add_argument("--max-size", default="256MB", help="largest shard, by source file sizes (e.g. 256MB, 1GB)")
    write.add_argument("--max-count", type=int, default=10_000, help="most samples per shard")
    write.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel writer processes")
    write.add_argument("--max-side", type=int, help="re-encode images larger than this (JPEG) to this longest side")
    write.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    write.set_defaults(func=cmd_shards_write)
    index = shards_sub.add_parser(
        "index", help="index existing shards (any writer)", description=cmd_shards_index.__doc__
    )
    index.add_argument("shards", help="a folder of .tar files, a brace pattern, or pipe:/fsspec URLs")
    index.add_argument("--out", help="index file to write (default: index.json beside the shards)")
    index.add_argument("--classes", help="comma-separated class names, for labels given as names")
    index.set_defaults(func=cmd_shards_index)

    cmp = sub.add_parser(
        "compare", help="an experiment's stage runs side by side, and a PNG of their curves",
        description=cmd_compare.__doc__,
    )  # fmt: skip
    cmp.add_argument("experiment", help="MLflow experiment name (a config's `name`)")
    cmp.add_argument("--stage", help="only this stage's runs (e.g. pretrain)")
    cmp.add_argument("--metrics", nargs="+", default=["train/loss", "eval/top1"], help="curves to plot")
    cmp.add_argument("--png", help="where to write the plot (default: <experiment>-compare.png)")
    cmp.add_argument("--max-runs", type=int, default=20, help="the most recent this many stage runs")
    cmp.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    cmp.set_defaults(func=cmd_compare)

    export = sub.add_parser(
        "export", help="sharded checkpoint -> consolidated safetensors", description=cmd_export.__doc__
    )
    export.add_argument("source", help="a stage folder (its latest checkpoint), a checkpoints folder, or a step-N one")
    export.add_argument("out", help="output .safetensors (model.json is written beside it)")
    export.set_defaults(func=cmd_export)

    description = "Benchmarks. Each prints a table (--json: the result too) and measures its baselines in the same run."
    bench.add_commands(
        sub.add_parser("bench", help="benchmarks (print a table; --json for machines)", description=description)
    )
    weights = sub.add_parser("weights", help="convert Mixer weights between layouts", description="Weight tools.")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True, metavar="COMMAND")
    imp = weights_sub.add_parser("import", help=".npz / timm -> safetensors", description=cmd_weights_import.__doc__)
    imp.add_argument("source", help="official or big_vision .npz, timm .pth/.bin/.safetensors")
    imp.add_argument("out", help="output .safetensors (model.json is written beside it)")
    imp.set_defaults(func=cmd_weights_import)
    exp = weights_sub.add_parser("export", help="weights -> official .npz", description=cmd_weights_export.__doc__)
    exp.add_argument("source", help="a stage's model.safetensors, or any file `weights import` reads")
    exp.add_argument("out", help="output .npz")
    exp.set_defaults(func=cmd_weights_export)
    return parser


# What a library error means to the shell: the first matching row's exit code, the message on one line. Anything
# else is a bug, and keeps its traceback.
EXIT_CODES = (
    (StageFailed, 1),  # the failing ranks printed their tracebacks above
    (SubmitError, 1),  # the scheduler refused, or the cluster section cannot be met
    ((ConfigError, CheckpointError, DataError, FileNotFoundError, LookupError, ValueError), 2),  # bad input
)


def main(argv: list[str] | None = None) -> int:
    dist.prepare_cuda_env()  # every rank, benchmark and job starts here, before anything touches the GPU
    parser = build_parser()
    # Overrides may come after flags (`mixer run CONFIG --dry-run key=value`), which argparse leaves unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mixer: interrupted", file=sys.stderr)
        return 130
    except StagePreempted as err:  # the stage saved and stopped: the scheduler should run it again
        print(f"mixer: {err}", file=sys.stderr)
        return REQUEUE_EXIT
    except Exception as err:
        code = next((code for kinds, code in EXIT_CODES if isinstance(err, kinds)), None)
        if code is None:
            raise
        print(f"mixer: error: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
