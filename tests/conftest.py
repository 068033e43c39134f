"""Shared helpers: run the real `mixer` CLI, and small shard sets written by the project's own writer."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """A small 'shapes' split: 300 samples in 3 shards of 100."""
    out = tmp_path_factory.mktemp("shapes") / "train"
    synthetic.write_dataset("shapes", out, samples=300, size=16, seed=0, max_count=100)
    return out
