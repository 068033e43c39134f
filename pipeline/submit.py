"""`mixer submit`: each stage of an experiment as a cluster job, chained so that each starts when the one before it
finished. The job files are rendered from the templates in `pipeline/jobs/` (package data), which hold no
hyper-parameters: every value comes from the experiment's config (`cluster:`, `launch.nproc_per_node`) and the run's
layout."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline import stages, tracking
from pipeline.config import ExperimentConfig, StageConfig
from pipeline.layout import RunLayout

JOBS = resources.files("pipeline") / "jobs"  # package data: a wheel install carries the templates too
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
    """The sbatch script of one stage (`pipeline/jobs/slurm.sbatch`)."""
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
            "preempted": shlex.quote(str(layout.stage(stage.name).preempted)),
            "python": shlex.quote(cluster.python),
            "nproc_per_node": str(cfg.launch.nproc_per_node),
            "rdzv_port": str(cluster.rdzv_port),
            "config": shlex.quote(str(layout.config)),
            "parent_run_id": shlex.quote(parent_run_id),
            "last": "--last" if last else "",
            "requeue": 'scontrol requeue "${SLURM_JOB_ID}"' if cluster.requeue else ":",
        },
    )


# The init container's loop: wait for the previous stage's result file (argv[1]; empty for the first stage).
WAIT_SCRIPT = "import os, sys, time\nwhile sys.argv[1] and not os.path.exists(sys.argv[1]):\n    time.sleep(15)"


def fill(template: Any, values: dict[str, Any]) -> Any:
    """A parsed YAML template with its placeholders filled: a string that is exactly `{{name}}` becomes the value
    itself (a number, a list, a mapping), a placeholder inside longer text is replaced as text."""
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole:
            if whole.group(1) not in values:
                raise KeyError(f"no value for {whole.group(1)!r} in the job template")
            return values[whole.group(1)]
        return render(template, {k: str(v) for k, v in values.items()})
    return template


def _label(text: str) -> str:
    """A Kubernetes name/label value: lower-case alphanumerics and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63] or "x"


def k8s_check(cfg: ExperimentConfig, layout: RunLayout) -> None:
    """What `--to k8s` needs, checked before any data is generated or file written."""
    if not cfg.cluster.image:
        raise SubmitError("'cluster.image' is required for Kubernetes jobs (docker/Dockerfile builds one)")
    root = layout.root.resolve()
    if not any(root.is_relative_to(Path(path)) for path in cfg.cluster.volumes.values()):
        raise SubmitError(
            f"output_dir {root} is on none of cluster.volumes' mount paths {sorted(cfg.cluster.volumes.values())}: "
            "the pods would not see the run's config and checkpoints"
        )
    if shutil.which("kubectl") is None:
        raise SubmitError("kubectl is not on PATH; `--to print` writes the manifests for applying elsewhere")


def pytorchjob(
    cfg: ExperimentConfig, layout: RunLayout, stage: StageConfig, parent_run_id: str, last: bool, previous: str | None
) -> dict:
    """The Kubeflow PyTorchJob of one stage (`pipeline/jobs/pytorchjob.yaml` and `pytorchjob-pod.yaml` beside it).
    `previous`: the stage whose result the pods wait for before starting."""
    cluster, job = cfg.cluster, cfg.cluster.job(stage.name)
    mounts = [{"name": f"data-{i}", "mountPath": path} for i, path in enumerate(cluster.volumes.values())]
    volumes: list[dict] = [
        {"name": f"data-{i}", "persistentVolumeClaim": {"claimName": claim}} for i, claim in enumerate(cluster.volumes)
    ]
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{cluster.shm_gib}Gi"}})
    resources: dict[str, dict[str, str]] = {}
    if job.gpus_per_node:
        resources["limits"] = {"nvidia.com/gpu": str(job.gpus_per_node)}
    if job.cpus_per_node:
        resources["requests"] = {"cpu": str(job.cpus_per_node)}
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg.tracking), **cluster.env}
    command = [cluster.python, "-m", "pipeline.launch", "--nproc-per-node", str(cfg.launch.nproc_per_node)]
    command += ["-m", "pipeline", "stage", str(layout.config), "--name", stage.name, "--submitted"]
    command += ["--parent-run-id", parent_run_id] if parent_run_id else []
    command += ["--last"] if last else []
    pod = fill(
        yaml.safe_load((JOBS / "pytorchjob-pod.yaml").read_text()),
        {
            "image": cluster.image,
            "python": cluster.python,
            "wait_script": WAIT_SCRIPT,
            "previous_result": str(layout.stage(previous).result) if previous else "",
            "command": command,
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "resources": resources,
            "volume_mounts": mounts,
            "volume_mounts_with_shm": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
            "volumes": volumes,
        },
    )
    manifest = fill(
        yaml.safe_load((JOBS / "pytorchjob.yaml").read_text()),
        {
            "job_name": _label(f"{cfg.name}-{stage.name}"),
            "namespace": cluster.namespace,
            "experiment_label": _label(cfg.name),
            "stage_label": _label(stage.name),
            "nproc_per_node": str(cfg.launch.nproc_per_node),
            "backoff_limit": cluster.backoff_limit,
            "workers": job.nodes - 1,
            "pod": pod,
        },
    )
    if job.nodes == 1:
        del manifest["spec"]["pytorchReplicaSpecs"]["Worker"]
    return manifest


class _PlainDumper(yaml.SafeDumper):
    """Writes a value shared by Master and Worker twice rather than as a YAML anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def hostfile(manifest: dict, slots: int) -> str:
    """DeepSpeed's hostfile for a PyTorchJob's pods (`<job>-master-0`, `<job>-worker-<i>`), for clusters that start
    ranks with the DeepSpeed launcher instead of torchrun."""
    name = manifest["metadata"]["name"]
    workers = manifest["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
    hosts = [f"{name}-master-0"] + [f"{name}-worker-{i}" for i in range(workers)]
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def submit(cfg: ExperimentConfig, to: str, description: str = "") -> list[Job]:
    """Prepare the run (resolved config, data), open its MLflow parent run and write one job file per unfinished
    stage under `<output_dir>/jobs/`: a Slurm script, and with `cluster.image` set a Kubeflow PyTorchJob and its
    DeepSpeed hostfile. `to="slurm"`: sbatch each with `--dependency=afterok` on the one before; `to="k8s"`:
    `kubectl apply` each (their init containers wait for the stage before); `to="print"`: write only."""
    if to == "k8s":
        stages.resolve_output_dir(cfg)
        k8s_check(cfg, RunLayout(Path(cfg.output_dir)))
    layout = stages.prepare(cfg, description=description)
    (layout.root / "jobs").mkdir(exist_ok=True)
    parent = stages.open_parent(cfg, layout)
    todo = [s for s in cfg.stages if layout.stage(s.name).read_result() is None]
    jobs, previous_job, previous_stage = [], None, None
    for stage in todo:
        last = stage is todo[-1]
        path = layout.root / "jobs" / f"{stage.name}.sbatch"
        path.write_text(slurm_script(cfg, layout, stage, parent.run_id or "", last))
        if cfg.cluster.image:
            manifest = pytorchjob(cfg, layout, stage, parent.run_id or "", last, previous_stage)
            k8s_path = layout.root / "jobs" / f"{stage.name}.pytorchjob.yaml"
            k8s_path.write_text(yaml.dump(manifest, Dumper=_PlainDumper, sort_keys=False, width=1000))
            hosts = hostfile(manifest, cfg.launch.nproc_per_node)
            (layout.root / "jobs" / f"{stage.name}.hostfile").write_text(hosts)
            if to == "k8s":
                path = k8s_path
        previous_stage = stage.name
        job = Job(stage.name, path)
        if to == "k8s":
            proc = subprocess.run(["kubectl", "apply", "-f", str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SubmitError(f"kubectl refused {path}: {proc.stderr.strip()}")
            job.job_id = proc.stdout.strip()
        if to == "slurm":
            cmd = ["sbatch", "--parsable"]
            if previous_job is not None:
                cmd.append(f"--dependency=afterok:{previous_job}")
            proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SubmitError(f"sbatch refused {path}: {proc.stderr.strip()}")
            job.job_id = previous_job = proc.stdout.strip().split(";")[0]
        jobs.append(job)
    return jobs
