"""`mixer submit`: each stage of an experiment as a cluster job, chained so that each starts when the one before it
finished. The job files are rendered from the templates in `jobs/`, which hold no hyper-parameters: every value comes
from the experiment's config (`cluster:`, `launch.nproc_per_node`) and the run's layout."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline import stages, tracking
from pipeline.config import ExperimentConfig, StageConfig
from pipeline.layout import RunLayout

JOBS = Path(__file__).resolve().parents[1] / "jobs"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SubmitError(RuntimeError):
    """The scheduler refused a job."""


@dataclass
class Job:
    stage: str
    path: Path
    job_id: str | None = None  # None: rendered only (`--to print`), or the stage had already finished


def render(template: str, values: dict[str, str]) -> str:
    """`{{name}}` placeholders filled from `values`; one without a value is an error, not an empty string."""
    missing = sorted(set(PLACEHOLDER.findall(template)) - values.keys())
    if missing:
        raise KeyError(f"no value for {missing} in the job template")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def slurm_script(cfg: ExperimentConfig, layout: RunLayout, stage: StageConfig, parent_run_id: str, last: bool) -> str:
    """The sbatch script of one stage (`jobs/slurm.sbatch`)."""
    cluster, job = cfg.cluster, cfg.cluster.job(stage.name)
    options = []
    if job.partition:
        options.append(f"#SBATCH --partition={job.partition}")
    if job.gpus_per_node:
        options.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        options.append(f"#SBATCH --cpus-per-task={job.cpus_per_node}")
    if cluster.requeue:
        options.append("#SBATCH --requeue")
    # The jobs log to the store `mixer submit` used, whichever way it was chosen.
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg.tracking), **cluster.env}
    return render(
        (JOBS / "slurm.sbatch").read_text(),
        {
            "job_name": f"{cfg.name}-{stage.name}",
            "nodes": str(job.nodes),
            "time": job.time,
            "workdir": str(Path.cwd()),
            "log": str(layout.root / "jobs" / f"{stage.name}-%j.log"),
            "signal_seconds": str(cluster.signal_seconds),
            "sbatch_options": "\n".join(options),
            "exports": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
            "stage": stage.name,
            "preempted": str(layout.stage(stage.name).preempted),
            "python": shlex.quote(cluster.python),
            "nproc_per_node": str(cfg.launch.nproc_per_node),
            "rdzv_port": str(cluster.rdzv_port),
            "config": str(layout.config),
            "parent_run_id": parent_run_id or "''",
            "last": "--last" if last else "",
            "requeue": 'scontrol requeue "${SLURM_JOB_ID}"' if cluster.requeue else ":",
        },
    )


def submit(cfg: ExperimentConfig, to: str) -> list[Job]:
    """Prepare the run (resolved config, data), open its MLflow parent run and write one job file per unfinished
    stage under `<output_dir>/jobs/`; with `to="slurm"`, sbatch each with `--dependency=afterok` on the one before."""
    layout = stages.prepare(cfg)
    (layout.root / "jobs").mkdir(exist_ok=True)
    parent = stages.open_parent(cfg, layout)
    todo = [s for s in cfg.stages if layout.stage(s.name).read_result() is None]
    jobs, previous = [], None
    for stage in todo:
        path = layout.root / "jobs" / f"{stage.name}.sbatch"
        path.write_text(slurm_script(cfg, layout, stage, parent.run_id or "", last=stage is todo[-1]))
        job = Job(stage.name, path)
        if to == "slurm":
            cmd = ["sbatch", "--parsable"]
            if previous is not None:
                cmd.append(f"--dependency=afterok:{previous}")
            proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SubmitError(f"sbatch refused {path}: {proc.stderr.strip()}")
            job.job_id = previous = proc.stdout.strip().split(";")[0]
        jobs.append(job)
    return jobs
