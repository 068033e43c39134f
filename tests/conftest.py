"""Shared helpers: run the real `mixer` CLI, install missing Debian packages, and small shard sets written by the
project's own writer."""

from __future__ import annotations

import collections
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import synthetic

REPO = Path(__file__).resolve().parents[1]


def run_mixer(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` from the repository root, as a user would run `mixer`."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stage_losses(uri: str, stage_dir: Path) -> dict[int, float]:
    """The `train/loss` a stage logged to MLflow at `uri`, by step (its run id is in the stage folder)."""
    from mlflow.tracking import MlflowClient

    run_id = (stage_dir / "run_id").read_text().strip()
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


NO_GPU = "no CUDA device on this machine; `bash scripts/test-gpu.sh` runs them on one"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` (tests/gpu) are deselected where no CUDA device is visible, and counted in the summary
    (`pytest_terminal_summary`), so that none is skipped silently.

    Then modules with the most slow tests first (each module's tests keep their order). scripts/test.sh spreads the
    modules over two workers in this order, so the long runs start early and the quick modules fill in beside them,
    rather than a long one running last while the other worker idles."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not cuda_available():
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.stash[_DESELECTED_GPU] = len(gpu)
        if hasattr(config, "workeroutput"):  # a pytest-xdist worker: tell the controller, which prints the summary
            config.workeroutput["deselected_gpu"] = len(gpu)
    slow = collections.Counter(item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])


_DESELECTED_GPU = pytest.StashKey[int]()


def pytest_testnodedown(node, error) -> None:
    """pytest-xdist's controller: each worker collected (and deselected) the whole session's tests."""
    count = getattr(node, "workeroutput", {}).get("deselected_gpu", 0)
    node.config.stash[_DESELECTED_GPU] = max(count, node.config.stash.get(_DESELECTED_GPU, 0))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """How many GPU tests this run left out, and why."""
    count = config.stash.get(_DESELECTED_GPU, 0)
    if count:
        terminalreporter.write_line(f"deselected {count} GPU tests (marked gpu): {NO_GPU}", yellow=True)


def apt_install(*packages: str) -> None:
    """`apt-get install` Debian packages (those a test found missing). Test workers running side by side take
    turns: apt allows one at a time."""
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open("/tmp/mixer-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, capture_output=True)


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """A small 'shapes' split: 300 samples in 3 shards of 100."""
    out = tmp_path_factory.mktemp("shapes") / "train"
    synthetic.write_dataset("shapes", out, samples=300, size=16, seed=0, max_count=100)
    return out
