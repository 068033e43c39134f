"""The filesystem layout of a run, in one place.

<output_dir>/config.yaml                      the resolved config every stage reads
<output_dir>/parent_run_id                    the experiment's MLflow run (reused on rerun)
<output_dir>/lock                             held by the one `mixer run` writing here (and its launcher); says who
<output_dir>/stages/<stage>/deepspeed.json    the DeepSpeed config generated for the stage
<output_dir>/stages/<stage>/checkpoints/      DeepSpeed's sharded checkpoints (one file per rank)
<output_dir>/stages/<stage>/model.safetensors consolidated fp32 weights (+ model.json), no DeepSpeed needed
<output_dir>/stages/<stage>/run_id            the stage's MLflow run (reused on rerun)
<output_dir>/stages/<stage>/errors/           a failed rank's error in one line, then its traceback
<output_dir>/stages/<stage>/result.json       written last: the stage finished
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def parent_run_id(self) -> Path:
        return self.root / "parent_run_id"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def data_index(self) -> Path:
        """Indexes written at launch for shard lists that came without one."""
        return self.root / "data-index"

    def stage(self, name: str) -> StageLayout:
        return StageLayout(self.root / "stages" / name)


@dataclass(frozen=True)
class StageLayout:
    root: Path

    @property
    def deepspeed_config(self) -> Path:
        return self.root / "deepspeed.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def model_config(self) -> Path:
        return self.root / "model.json"

    @property
    def run_id(self) -> Path:
        return self.root / "run_id"

    @property
    def preempted(self) -> Path:
        """Holds the step at which the stage saved and stopped on a scheduler's signal; removed on resume."""
        return self.root / "preempted"

    @property
    def errors(self) -> Path:
        """`rank<r>.txt` for each rank of the last attempt that failed: one line saying what, then the traceback."""
        return self.root / "errors"

    def error_file(self, rank: int) -> Path:
        return self.errors / f"rank{rank:05d}.txt"

    def first_error(self) -> str | None:
        """The one-line error of the rank that failed first (the others often fail only because it did)."""
        files = sorted(self.errors.glob("rank*.txt"), key=lambda p: p.stat().st_mtime_ns)  # none: no folder
        return files[0].read_text().split("\n", 1)[0] if files else None

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    def read_result(self) -> dict | None:
        return json.loads(self.result.read_text()) if self.result.exists() else None

    def write_result(self, result: dict) -> None:
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(self.result)
