"""The only importer of mlflow. One parent run per experiment, one child run per stage (tag `stage`).

Only the primary rank tracks; everyone else, and every process when tracking is off, gets `NullTracker`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import ExperimentConfig, TrackingConfig

DEFAULT_STORE = Path("runs") / "mlflow.db"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
MODEL_ARTIFACT = "model"  # a training stage's exported weights and model.json, under the run's artifacts


class NullTracker:
    """Tracking switched off, or not the primary rank: every call does nothing."""

    run_id: str | None = None
    resumed: bool = False  # True when continuing a run started by an earlier, interrupted attempt

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_model(self, files: list[Path], registered_name: str | None, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, written through `MlflowClient` (no global active-run state)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, "None" if v is None else str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_model(self, files: list[Path], registered_name: str | None, tags: dict[str, str]) -> None:
        """`files` as the run's `model` artifact; with `registered_name`, also a new version of that registered
        model (created if missing). A store without a registry gets a `model_registry` tag saying why instead."""
        from mlflow.exceptions import MlflowException

        for path in files:
            self.client.log_artifact(self.run_id, str(path), MODEL_ARTIFACT)
        if registered_name is None:
            return
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        try:
            try:
                self.client.get_registered_model(registered_name)
            except MlflowException:
                self.client.create_registered_model(registered_name)
            version = self.client.create_model_version(registered_name, source, run_id=self.run_id, tags=tags)
        except MlflowException as err:
            self.set_tags({"model_registry": f"unavailable: {err.message[:200]}"})
            return
        self.set_tags({"model_version": f"{registered_name}/{version.version}"})

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def tracking_uri(cfg: TrackingConfig) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then a SQLite file under ./runs (embedded, nothing to start)."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    # MLflow and Alembic announce every schema migration of a new SQLite store at INFO.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # Keep a local store's artifacts beside its database, not in whatever directory we run from.
        location = (Path(urlparse(uri).path).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _run(cfg: ExperimentConfig, id_file: Path, run_name: str, tags: dict[str, str]) -> NullTracker:
    """Continue the run whose id is in `id_file` (a rerun after a kill), else start one and remember it."""
    uri = tracking_uri(cfg.tracking)
    client = _client(uri)
    if id_file.exists():
        run_id = id_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        tracker = MlflowTracker(client, run_id)
        tracker.resumed = True
        tracker.set_tags({"resumed": "true"})
        return tracker
    experiment_id = _experiment_id(client, cfg.tracking.experiment or cfg.name, uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    id_file.write_text(run.info.run_id)
    return MlflowTracker(client, run.info.run_id)


def start_parent(cfg: ExperimentConfig, id_file: Path) -> NullTracker:
    """The experiment's run, created by `mixer run` before any stage starts."""
    if not cfg.tracking.enabled:
        return NullTracker()
    return _run(cfg, id_file, cfg.name, {"kind": "experiment"})


def existing_run(cfg: ExperimentConfig, run_id: str | None) -> NullTracker:
    """A tracker for a run someone else started (a submitted job closing the experiment's run)."""
    if not (cfg.tracking.enabled and run_id):
        return NullTracker()
    return MlflowTracker(_client(tracking_uri(cfg.tracking)), run_id)


def start_stage(
    cfg: ExperimentConfig, stage_name: str, kind: str, id_file: Path, parent_run_id: str | None, primary: bool
) -> NullTracker:
    """The stage's child run; only the primary rank gets a real tracker."""
    if not (cfg.tracking.enabled and primary):
        return NullTracker()
    tags = {"stage": stage_name, "kind": kind}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return _run(cfg, id_file, stage_name, tags)


def ui_command(cfg: TrackingConfig) -> str:
    """How to open the MLflow UI on this store."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"
