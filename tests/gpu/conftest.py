"""The GPU lane's shared parts: one generated shard set for the whole session, and `mixer run` of the GPU config
with overrides, returning what the stage logged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.data import synthetic
from tests.conftest import REPO, run_mixer, stage_losses

GPU_CONFIG = REPO / "tests" / "configs" / "gpu.yaml"


@pytest.fixture(scope="session")
def gpu_shapes(tmp_path_factory) -> Path:
    """The GPU config's data set, written once: `datasets.shapes.path` for every run of the session."""
    root = tmp_path_factory.mktemp("gpu-shapes")
    synthetic.write_dataset("shapes", root / "train", samples=2048, size=32, seed=0)
    synthetic.write_dataset("shapes", root / "eval", samples=256, size=32, seed=1)
    return root


@dataclass
class StageRun:
    out: Path
    uri: str
    stdout: str

    @property
    def stage(self) -> Path:
        return self.out / "stages" / "pretrain"

    def losses(self) -> dict[int, float]:
        return stage_losses(self.uri, self.stage)


def run_gpu_config(tmp_path: Path, name: str, data: Path, *overrides: str) -> StageRun:
    """`mixer run tests/configs/gpu.yaml` into `tmp_path/name`, MLflow in `tmp_path/mlflow.db`; must succeed."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / name
    args = ["run", str(GPU_CONFIG), f"output_dir={out}", f"datasets.shapes.path={data}", *overrides]
    result = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return StageRun(out, uri, result.stdout)


def curves_agree(a: dict[int, float], b: dict[int, float], tolerance: float) -> list[tuple[int, float, float]]:
    """The logged steps at which two loss curves differ by more than `tolerance` (relative); both must have logged
    the same steps."""
    assert sorted(a) == sorted(b) and len(a) >= 4, (sorted(a), sorted(b))
    return [(s, a[s], b[s]) for s in sorted(a) if abs(a[s] - b[s]) > tolerance * max(abs(b[s]), 1e-6)]
