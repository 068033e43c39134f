"""The stage graph: prepare data, then launch each stage as a torchrun job, in order, under one parent run."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline import checkpoint, dist, tracking
from pipeline.config import (
    ConfigError,
    ExperimentConfig,
    GenerateConfig,
    StageConfig,
    dump_config,
    flatten,
    read_header,
    to_dict,
)
from pipeline.data import synthetic
from pipeline.data.index import INDEX_NAME, DataError, read_index
from pipeline.data.sources import prepare_sources
from pipeline.data.stream import stream_plan
from pipeline.launch import PARENT_PID
from pipeline.layout import RunLayout

log = logging.getLogger(__name__)

# Exit status of a stage (and of `mixer run`) that saved a checkpoint and stopped on SIGTERM/SIGUSR1: run the same
# command again (Slurm: requeue the job) to resume. 75 is EX_TEMPFAIL, "try again later".
REQUEUE_EXIT = 75


class StagePreempted(RuntimeError):
    def __init__(self, stage: str, step: str | None) -> None:
        where = "at its end, the stage complete" if step is None else f"at step {step} after saving a checkpoint"
        super().__init__(
            f"stage {stage!r} stopped on a signal {where}; run the same command again to resume (exit status "
            f"{REQUEUE_EXIT})"
        )


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, first_error: str | None = None) -> None:
        cause = f": {first_error}" if first_error else "; its ranks' errors are above"
        super().__init__(f"stage {stage!r} failed (exit status {returncode}){cause}")
        self.stage = stage
        self.returncode = returncode


def resolve_output_dir(cfg: ExperimentConfig) -> None:
    """Default `runs/<name>`; made absolute so every rank and every node agree on it."""
    cfg.output_dir = str(Path(cfg.output_dir or Path("runs") / cfg.name).resolve())


class OutputLock:
    """The one writer of an `output_dir`: an exclusive `flock` on `<output_dir>/lock`, which also says who holds it.

    Two `mixer run`s of one config at once would create two parent runs, overwrite each other's results and
    register two model versions. The lock is released when its holder exits, however it ends (the kernel drops
    it); stage launchers inherit it, so a launcher still shutting down its ranks keeps a rerun out until it has.
    """

    def __init__(self, root: Path, command: str) -> None:
        path = RunLayout(root).lock
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"'output_dir' {root} cannot be written: {err}") from err
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a process that has not said who it is"
            os.close(self.fd)
            raise ConfigError(
                f"'output_dir' {root} is in use by {holder}: wait for it to end (or stop it), or give this run "
                "another output_dir"
            ) from None
        os.ftruncate(self.fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {since} ({command})\n".encode())


def prepare(cfg: ExperimentConfig, generate_data: bool = True, description: str = "") -> RunLayout:
    """Output directory, the resolved config every stage reads (under `description`, the source file's header),
    and any generated data set."""
    resolve_output_dir(cfg)
    checkpoint.stage_specs(cfg)  # refuses a resolution change that App. C cannot make, before anything starts
    layout = RunLayout(Path(cfg.output_dir))
    try:  # found here, not at the first checkpoint
        layout.root.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, layout.config, description)
    except OSError as err:
        raise ConfigError(f"'output_dir' {layout.root} cannot be written: {err}") from err
    for dataset in cfg.datasets.values() if generate_data else ():
        if dataset.generate is not None:
            ensure_generated(dataset.path, dataset.generate, dataset.train_split, dataset.eval_split)
    if generate_data:
        check_training_data(cfg, layout)
    return layout


def check_training_data(cfg: ExperimentConfig, layout: RunLayout) -> None:
    """Before launch: every stage's held-out split has an index (a training stage evaluates at its end), every
    training stage's sources have one with as many classes as the data set says, and its plan can run (e.g. enough
    shards for split mode)."""
    world = cfg.launch.nproc_per_node * cfg.launch.nnodes
    for stage in cfg.stages:
        dataset = cfg.datasets[stage.dataset]
        try:
            read_index(Path(dataset.path) / dataset.eval_split)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"stage {stage.name} evaluates on datasets.{stage.dataset}'s eval split: {err}") from err
        if not stage.kind.trains:
            continue
        if dataset.num_classes == 1:
            log.warning("stage %s trains on one class (datasets.%s.num_classes): it learns nothing", stage.name,
                        stage.dataset)  # fmt: skip
        sources = prepare_sources(dataset, layout.data_index)
        for source in sources:
            if source.classes and len(source.classes) != dataset.num_classes:
                raise ConfigError(
                    f"stage {stage.name}: 'datasets.{stage.dataset}.num_classes' is {dataset.num_classes}, but the "
                    f"index of {source.name} lists {len(source.classes)} classes"
                )
        try:
            stream_plan(cfg, stage, 0, world, sources).check()
        except DataError as err:
            raise ConfigError(f"stage {stage.name}: {err}") from err


def ensure_generated(path: str, gen: GenerateConfig, train_split: str, eval_split: str) -> None:
    """Write a procedural data set's shards unless they exist; a split appears only once complete."""
    for split, count, seed in (
        (train_split, gen.train_samples, gen.seed),
        (eval_split, gen.eval_samples, gen.seed + 1),
    ):
        target = Path(path) / split
        if (target / INDEX_NAME).exists():
            continue
        partial = target.with_name(f".{split}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        if gen.kind == "photos":
            # Shards of ~125 images: enough of them for split mode on 8 ranks x 8 workers from 8,000 images.
            synthetic.make_photo_shards(partial, count, per_shard=125, seed=seed, desc=f"generating {target}")
        else:
            synthetic.write_dataset(
                gen.kind, partial, samples=count, size=gen.image_size, seed=seed, desc=f"generating {target}"
            )
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)


def launch_command(
    cfg: ExperimentConfig, config_path: Path, stage: StageConfig, parent_run_id: str | None, node_rank: int = 0
) -> list[str]:
    """torchrun running `mixer stage` on this node; the same command serves GPUs and several nodes."""
    launch = cfg.launch
    cmd = [
        sys.executable,
        "-m",
        "pipeline.launch",  # torchrun that a repeated SIGTERM does not cut short
        "--nnodes",
        str(launch.nnodes),
        "--nproc-per-node",
        str(launch.nproc_per_node),
    ]
    if launch.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            "--node-rank",
            str(node_rank),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            launch.rdzv_endpoint,
            "--rdzv-id",
            f"{cfg.name}-{stage.name}",
        ]
    cmd += ["-m", "pipeline", "stage", str(config_path), "--name", stage.name]
    if parent_run_id:
        cmd += ["--parent-run-id", parent_run_id]
    return cmd


def stage_env(cfg: ExperimentConfig) -> dict[str, str]:
    """One intra-op thread pool per rank that shares the node's cores (torchrun would warn and pick 1)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(dist.cores_per_rank(cfg.launch.nproc_per_node)))
    return env


def open_parent(cfg: ExperimentConfig, layout: RunLayout) -> tracking.NullTracker:
    """The experiment's MLflow run (the same one on a rerun), with the resolved config as params and artifact, and
    the config file's header (command, hardware, expected result) as the run's description."""
    parent = tracking.start_parent(cfg, layout.parent_run_id)
    if not parent.resumed:
        parent.log_params(flatten(to_dict(cfg)))
        parent.log_artifact(layout.config)
        description = read_header(layout.config)
        if description:
            parent.set_tags({tracking.DESCRIPTION_TAG: description})
    return parent


def log_stage_summary(parent: tracking.NullTracker, stage: str, result: dict) -> None:
    """A finished stage's final train/ and eval/ numbers on the experiment's run, as `<stage>/<metric>`."""
    parent.log_metrics({f"{stage}/{k}": v for k, v in result.items() if k.startswith(("eval/", "train/"))}, step=0)


def close_submitted_experiment(cfg: ExperimentConfig, run_id: str | None, status: str) -> None:
    """For a submitted job, which no `mixer run` parent watches, on the primary rank: the stages' summaries on the
    experiment's run, and its status."""
    if dist.read_env("cpu").rank != 0:
        return
    parent = tracking.existing_run(cfg, run_id)
    layout = RunLayout(Path(cfg.output_dir))
    for stage in cfg.stages:
        result = layout.stage(stage.name).read_result()
        if result is not None:
            log_stage_summary(parent, stage.name, result)
    parent.finish(status)


def run_experiment(cfg: ExperimentConfig, layout: RunLayout, lock: OutputLock | None = None) -> list[dict]:
    """Every stage in order; a finished stage (its result.json exists) is not run again. Each stage's launcher
    inherits `lock`."""
    parent = open_parent(cfg, layout)
    results = []
    try:
        for stage in cfg.stages:
            stage_layout = layout.stage(stage.name)
            done = stage_layout.read_result()
            signalled = False
            if done is None:
                cmd = launch_command(cfg, layout.config, stage, parent.run_id)
                started = time.time()
                stage_layout.preempted.unlink(missing_ok=True)
                shutil.rmtree(stage_layout.errors, ignore_errors=True)  # an earlier attempt's
                returncode, signalled = _launch(cmd, stage_env(cfg), () if lock is None else (lock.fd,))
                if stage_layout.preempted.exists():
                    raise StagePreempted(stage.name, stage_layout.preempted.read_text().strip())
                # The result is written once the stage's work is done: it stands even where torchrun, stopped by
                # the same signal, exits non-zero (an evaluation that finished before it got to a step to stop at).
                done = stage_layout.read_result()
                if done is None:
                    raise StageFailed(stage.name, returncode, stage_layout.first_error())
                done["wall_s"] = round(time.time() - started, 1)  # launch to exit, start-up included
            results.append(done)
            log_stage_summary(parent, stage.name, done)
            if signalled and stage is not cfg.stages[-1]:
                raise StagePreempted(stage.name, None)
    except (KeyboardInterrupt, StagePreempted):
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED")
    return results


def _launch(cmd: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> tuple[int, bool]:
    """Run a stage's launcher; SIGTERM/SIGUSR1 to this process are passed on to it once, as SIGTERM. Returns its
    exit status and whether a signal was passed on.

    The launcher gets a session of its own, so a signal to this process group reaches it only through here; torchrun
    then gives every rank SIGTERM and time to finish its step and save. If this process dies first (SIGKILL), the
    launcher gets that SIGTERM from the kernel (`pipeline.launch`): no stage trains on with nobody waiting for it.
    """
    env = {**env, PARENT_PID: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=pass_fds)
    forwarded = False

    def forward(signum: int, frame: object) -> None:
        nonlocal forwarded
        if not forwarded:
            forwarded = True
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait(), forwarded
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
