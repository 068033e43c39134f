"""Two nodes on one machine: two torchrun launchers with node ranks 0 and 1, joined by a c10d rendezvous on
127.0.0.1, form one job of 2 nodes x 1 process and train a stage to the end, as `mixer submit` runs them."""

import subprocess

import pytest

from pipeline import stages
from pipeline.config import load_config
from pipeline.layout import RunLayout
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_two_launchers_with_node_ranks_0_and_1_train_one_stage_together(tmp_path):
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        f"datasets.shapes.path={tmp_path / 'data' / 'shapes'}",
        f"datasets.novel.path={tmp_path / 'data' / 'novel'}",
        "launch.nnodes=2",
        "launch.nproc_per_node=1",
        "launch.rdzv_endpoint=127.0.0.1:29631",
        "tracking.enabled=false",
    ]
    cfg = load_config(str(REPO / "tests" / "configs" / "tiny.yaml"), overrides)
    layout = stages.prepare(cfg)
    stage = cfg.stage("pretrain")
    nodes = [
        subprocess.Popen(
            stages.launch_command(cfg, layout.config, stage, None, node_rank=rank),
            cwd=REPO,
            env=stages.stage_env(cfg),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    result = RunLayout(tmp_path / "out").stage("pretrain").read_result()
    assert result is not None and result["steps"] == stage.steps
    latest = (tmp_path / "out" / "stages" / "pretrain" / "checkpoints" / "latest").read_text().strip()
    shards = sorted(p.name for p in (tmp_path / "out" / "stages" / "pretrain" / "checkpoints" / latest).glob("*optim*"))
    assert len(shards) == 2, shards  # one ZeRO shard per rank: a world of 2, one rank from each launcher
