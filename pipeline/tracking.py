"""The only importer of mlflow. One parent run per experiment, one child run per stage (tag `stage`).

Only the primary rank tracks; everyone else, and every process when tracking is off, gets `NullTracker`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import ConfigError, ExperimentConfig, TrackingConfig

DEFAULT_STORE = Path("runs") / "mlflow.db"
# The run's description in MLflow's UI (its "Description" box, Markdown).
DESCRIPTION_TAG = "mlflow.note.content"
# MLflow 3's UI opens an experiment on its GenAI "Overview" page (traces) unless the experiment says it is model
# training: then it opens on the runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_PORT = 5000
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
MODEL_ARTIFACT = "model"  # a training stage's exported weights and model.json, under the run's artifacts
log = logging.getLogger(__name__)


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

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        pass


def _refused(err: Exception) -> bool:
    """An answer from the tracking store that a retry would get again (bad request, no such run): HTTP 4xx."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and 400 <= err.get_http_status_code() < 500


class _Sender:
    """Runs a tracker's calls on a background thread, in order, so that training never waits for the tracking
    server. A call that fails (server down or unreachable, after MLflow's own HTTP retries) stays first in line
    and is retried with back-off; metrics logged meanwhile are kept, up to `max_pending` values (the oldest are
    dropped beyond that, and counted), and sent in batches of up to 1,000 once the server is back."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(
        self, send_metrics: Callable[[list], None], max_pending: int = 200_000, retry_max_s: float = 30.0
    ) -> None:
        self.send_metrics, self.max_pending, self.retry_max_s = send_metrics, max_pending, retry_max_s
        self.pending: deque[tuple[str, Any]] = deque()  # ("metrics", [Metric]) or (kind, call)
        self.pending_values = 0  # metric values waiting
        self.dropped = 0  # metric values given up on
        self.failures = 0  # failed attempts, all calls
        self.last_error: str | None = None
        self._cond = threading.Condition()
        self._busy = 0  # how many items at the front of `pending` the thread is sending now
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any], kind: str = "call") -> None:
        with self._cond:
            self.pending.append((kind, call))
            self._cond.notify_all()

    def submit_metrics(self, metrics: list) -> None:
        with self._cond:
            self.pending.append(("metrics", metrics))
            self.pending_values += len(metrics)
            while self.pending_values > self.max_pending:  # drop the oldest metrics not being sent right now
                index = next(
                    (i for i, (kind, _) in enumerate(self.pending) if kind == "metrics" and i >= self._busy), None
                )
                if index is None:
                    break
                self._remove(index, sent=False)
            self._cond.notify_all()

    def _remove(self, index: int, sent: bool) -> None:
        """Take item `index` off the queue; metric values that were not sent count as dropped."""
        kind, payload = self.pending[index]
        del self.pending[index]
        if kind == "metrics":
            self.pending_values -= len(payload)
            if not sent:
                self.dropped += len(payload)

    def _next_call(self) -> tuple[str, Callable[[], Any], int]:
        """The front of the queue as one call: consecutive metric batches merged up to BATCH values."""
        kind, payload = self.pending[0]
        if kind != "metrics":
            return kind, payload, 1
        metrics, count = list(payload), 1
        while count < len(self.pending) and self.pending[count][0] == "metrics":
            more = self.pending[count][1]
            if len(metrics) + len(more) > self.BATCH:
                break
            metrics.extend(more)
            count += 1
        return kind, lambda: self.send_metrics(metrics), count

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self.pending:
                    self._cond.wait()
                kind, call, count = self._next_call()
                self._busy = count
            try:
                call()
            except Exception as err:  # noqa: BLE001 - whatever the client raised: retried, or dropped if refused
                with self._cond:
                    self._busy = 0
                    if _refused(err):  # the server answered and said no (4xx): sending it again cannot help
                        log.warning("MLflow refused a %s call, dropped: %s", kind, str(err)[:300])
                        for _ in range(count):
                            self._remove(0, sent=False)
                        self._cond.notify_all()
                        continue
                    self.failures += 1
                    self.last_error = f"{type(err).__name__}: {str(err)[:300]}"
                    if self.failures == 1 or self.failures % 20 == 0:
                        log.warning("MLflow unreachable (%s); training goes on, retrying", self.last_error)
                    self._cond.wait(delay)
                delay = min(2 * delay, self.retry_max_s)
                continue
            delay = 1.0
            with self._cond:
                for _ in range(count):
                    self._remove(0, sent=True)
                self._busy = 0
                self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything submitted so far has been sent, at most `timeout_s`; True if it was. A sender
        waiting out a back-off retries at once: the server may be back, and the caller has only so long."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def abandon(self) -> int:
        """Give up on what is still pending (the sender keeps trying only its current call); metric values lost."""
        with self._cond:
            before = self.dropped
            while len(self.pending) > self._busy:
                self._remove(len(self.pending) - 1, sent=False)
            return self.dropped - before


class MlflowTracker(NullTracker):
    """One MLflow run, written through `MlflowClient` (no global active-run state). Params, metrics, tags and
    artifacts go through a `_Sender`: a tracking server that is down delays them but never stops training.
    `finish` waits up to `flush_timeout_s` for them; values that could not be sent by then are reported as
    dropped (a warning, and the run's `tracking/dropped_values` tag when the server is back)."""

    def __init__(self, client: Any, run_id: str, flush_timeout_s: float = 120.0) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_timeout_s = flush_timeout_s
        self.sender = _Sender(lambda metrics: self.client.log_batch(self.run_id, metrics=metrics))
        self.logged_through: dict[str, int] = {}  # a continued run: the last step of each metric it already has

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, "None" if v is None else str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self.sender.submit(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk), "params")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the time it was measured, however late it reaches the server
        # A stage resumed from its checkpoint replays the steps it had logged after it before it was killed; the
        # run keeps the values it has (a resume replays them exactly) instead of getting each step twice.
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.logged_through.get(k, -1)]
        if not batch:
            return
        self.sender.submit_metrics(batch)

    def log_artifact(self, path: Path) -> None:
        self.sender.submit(lambda: self.client.log_artifact(self.run_id, str(path)), "artifact")

    def log_text(self, text: str, artifact_file: str) -> None:
        self.sender.submit(lambda: self.client.log_text(self.run_id, text, artifact_file), "artifact")

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.sender.submit(lambda key=key, value=value: self.client.set_tag(self.run_id, key, value), "tag")

    def log_model(self, files: list[Path], registered_name: str | None, tags: dict[str, str]) -> None:
        """`files` as the run's `model` artifact; with `registered_name`, also a new version of that registered
        model (created if missing). A store without a registry gets a `model_registry` tag saying why instead."""
        self.sender.submit(lambda: self._log_model(files, registered_name, tags), "model")

    def _log_model(self, files: list[Path], registered_name: str | None, tags: dict[str, str]) -> None:
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
            if err.get_http_status_code() >= 500:
                raise  # the server, not the store: retried
            self.client.set_tag(self.run_id, "model_registry", f"unavailable: {err.message[:200]}")
            return
        self.client.set_tag(self.run_id, "model_version", f"{registered_name}/{version.version}")

    def flush(self, timeout_s: float | None = None) -> bool:
        return self.sender.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Send what is pending (at most `timeout_s`, by default `flush_timeout_s`), then close the run."""
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        if not self.flush(timeout_s):
            lost = self.sender.abandon()
            log.warning(
                "MLflow run %s: %d metric values and other pending calls not sent within %.0f s (%s); dropped",
                self.run_id, lost, timeout_s, self.sender.last_error,
            )  # fmt: skip
        try:
            if self.sender.dropped:
                self.client.set_tag(self.run_id, "tracking/dropped_values", str(self.sender.dropped))
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001 - the run's work is done; its record is what is missing
            log.warning("MLflow run %s could not be marked %s: %s", self.run_id, status, err)


def tracking_uri(cfg: TrackingConfig) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then a SQLite file under ./runs (embedded, nothing to start)."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def check_reachable(cfg: TrackingConfig, timeout_s: float = 10.0) -> None:
    """Before launch: a tracking server that does not answer is a `ConfigError` naming it, within seconds. (Once
    runs exist, an outage only delays what the sender queues; but creating them has to reach the server, and
    MLflow's own retries would keep a launch waiting minutes with nothing on the console.) Any HTTP answer counts:
    a server behind authentication answers too."""
    if not cfg.enabled:
        return
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return  # a database or a folder: opened where it is used
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"the MLflow tracking server {uri} does not answer ({reason}): start it, point tracking.uri or "
            "MLFLOW_TRACKING_URI at one that runs, or set tracking.enabled=false"
        ) from None


def open_client(uri: str) -> Any:
    """An MlflowClient on `uri`, with MLflow's start-up chatter quietened.

    The sender (`_Sender`) retries failed calls itself for as long as it takes. MLflow's own HTTP retries (7 by
    default, backing off to a minute and more inside one call) would only keep it from seeing that the server is
    back, past the ~30 s a preempted job has before it is killed, and would hold a rank's start for minutes on a
    server that is down. Set in the environment, these settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    from mlflow.tracking import MlflowClient

    # MLflow and Alembic announce every schema migration of a new SQLite store at INFO.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if not set(EXPERIMENT_KIND) <= set(experiment.tags):  # made by an older version or by hand
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # Keep a local store's artifacts beside its database, not in whatever directory we run from.
        location = (Path(urlparse(uri).path).parent / "mlartifacts").resolve().as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException as err:  # another run on the same server created it a moment ago
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        log.debug("experiment %s created concurrently: %s", name, err)
        return experiment.experiment_id


def _run(cfg: ExperimentConfig, id_file: Path, run_name: str, tags: dict[str, str]) -> NullTracker:
    """Continue the run whose id is in `id_file` (a rerun after a kill), else start one and remember it."""
    uri = tracking_uri(cfg.tracking)
    client = open_client(uri)
    if id_file.exists():
        run_id = id_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        tracker = MlflowTracker(client, run_id, cfg.tracking.flush_timeout_s)
        tracker.resumed = True
        tracker.logged_through = {
            key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics
        }
        tracker.set_tags({"resumed": "true"})
        return tracker
    experiment_id = _experiment_id(client, cfg.tracking.experiment or cfg.name, uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    id_file.write_text(run.info.run_id)
    return MlflowTracker(client, run.info.run_id, cfg.tracking.flush_timeout_s)


def start_parent(cfg: ExperimentConfig, id_file: Path) -> NullTracker:
    """The experiment's run, created by `mixer run` before any stage starts."""
    if not cfg.tracking.enabled:
        return NullTracker()
    return _run(cfg, id_file, cfg.name, {"kind": "experiment"})


def existing_run(cfg: ExperimentConfig, run_id: str | None) -> NullTracker:
    """A tracker for a run someone else started (a submitted job closing the experiment's run)."""
    if not (cfg.tracking.enabled and run_id):
        return NullTracker()
    return MlflowTracker(open_client(tracking_uri(cfg.tracking)), run_id, cfg.tracking.flush_timeout_s)


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


def runs_view(cfg: TrackingConfig, experiment: str) -> tuple[str, str]:
    """How to see an experiment's runs: the command that starts the MLflow UI on this store ("" for a tracking
    server, which serves its own) and the address of the experiment's runs view there."""
    uri = tracking_uri(cfg)
    found = open_client(uri).get_experiment_by_name(experiment)
    route = f"#/experiments/{found.experiment_id}/runs" if found is not None else "#/experiments"
    if uri.startswith(("http://", "https://")):
        return "", f"{uri.rstrip('/')}/{route}"
    return f"mlflow ui --backend-store-uri {uri} --port {UI_PORT}", f"http://127.0.0.1:{UI_PORT}/{route}"
