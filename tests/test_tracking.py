"""The tracker's background sender: order, batching, retries and the bound on what it keeps."""

import threading
import time

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from pipeline.tracking import _Sender
from tests.conftest import REPO


class Store:
    """Records what reaches it; raises like an unreachable server (a 5xx MlflowException) while `down` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls: list = []

    def metrics(self, metrics: list) -> None:
        if self.down.is_set():
            raise MlflowException("API request failed: connection refused")  # INTERNAL_ERROR: HTTP 500
        self.calls.append([m.step for m in metrics])

    def tag(self, value: str) -> None:
        if self.down.is_set():
            raise MlflowException("API request failed: connection refused")
        self.calls.append(value)


def metric(step: int) -> Metric:
    return Metric("train/loss", 1.0 / step, 0, step)


def test_held_back_metrics_arrive_in_order_in_batches_once_the_store_is_back():
    store = Store()
    sender = _Sender(store.metrics, retry_max_s=0.05)
    store.down.set()
    for step in range(1, 1201):
        sender.submit_metrics([metric(step)])
        if step == 600:
            sender.submit(lambda: store.tag("half"), "tag")
    assert not sender.flush(0.3) and store.calls == [] and sender.failures >= 1
    store.down.clear()
    assert sender.flush(10)
    steps = [s for call in store.calls if isinstance(call, list) for s in call]
    assert steps == list(range(1, 1201)) and sender.dropped == 0
    half = store.calls.index("half")  # the tag went between step 600's metrics and step 601's
    assert store.calls[half - 1][-1] == 600 and store.calls[half + 1][0] == 601
    assert max(len(c) for c in store.calls if isinstance(c, list)) <= _Sender.BATCH  # merged, within MLflow's limit


def test_beyond_the_bound_the_oldest_metrics_are_dropped_and_counted():
    store = Store()
    store.down.set()
    sender = _Sender(store.metrics, max_pending=100, retry_max_s=0.05)
    for step in range(1, 301):
        sender.submit_metrics([metric(step)])
    assert sender.pending_values <= 100 and sender.dropped >= 200
    store.down.clear()
    assert sender.flush(10)
    steps = [s for call in store.calls for s in call]
    assert steps[-100:] == list(range(201, 301)) and len(steps) + sender.dropped == 300


def test_a_refused_call_is_dropped_not_retried_forever():
    store = Store()
    sender = _Sender(store.metrics, retry_max_s=0.05)

    def refused():
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)  # HTTP 404

    sender.submit(refused, "tag")
    sender.submit_metrics([metric(1)])
    assert sender.flush(5) and store.calls == [[1]]


def test_flush_cuts_a_back_off_short_when_the_store_is_back():
    store = Store()
    store.down.set()
    sender = _Sender(store.metrics, retry_max_s=30)
    sender.submit_metrics([metric(1)])
    deadline = time.monotonic() + 10
    while sender.failures < 3:  # back-off 1 s, then 2 s: now waiting 4 s before the next try
        assert time.monotonic() < deadline
        time.sleep(0.05)
    store.down.clear()
    started = time.monotonic()
    assert sender.flush(1.0), "flush woke the sender, which sent at once"
    assert time.monotonic() - started < 1.0 and store.calls == [[1]]


def test_a_tracking_server_that_does_not_answer_stops_the_launch_within_seconds(tmp_path, monkeypatch, capsys):
    import time

    from pipeline import cli
    from pipeline.dist import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    code = cli.main(["run", str(REPO / "tests" / "configs" / "tiny.yaml"), f"output_dir={tmp_path}/out"])
    assert code == 2 and time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and uri in err[0] and "does not answer" in err[0]
    assert not (tmp_path / "out" / "stages").exists()
