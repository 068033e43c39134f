"""`mixer compare EXPERIMENT`: an experiment's stage runs side by side (what differs in their settings, final
metrics, throughput) and their curves in one PNG, for those who would rather look than query MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Shown for every run, whether or not they differ: what people ask first about a stage.
KEY_PARAMS = ("model.variant", "stage.steps", "stage.micro_batch", "stage.optim.lr", "deepspeed.zero_stage")
FINAL_METRICS = ("train/loss", "eval/top1", "eval/top5", "train/img_per_s", "train/mfu")
MAX_DIFFERING = 6  # differing params shown beyond KEY_PARAMS, the first ones in name order


@dataclass
class StageRun:
    run_id: str
    stage: str
    status: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.stage} {self.run_id[:8]}"


def stage_runs(
    client: Any, experiment: str, stage: str | None = None, limit: int = 20, curves: tuple[str, ...] = ()
) -> list[StageRun]:
    """The experiment's stage runs (tag `stage`), oldest first; with `stage`, only that stage's."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow experiment named {experiment!r}")
    query = f"tags.stage = '{stage}'" if stage else "tags.stage != ''"
    runs = client.search_runs([found.experiment_id], query, max_results=limit, order_by=["attributes.start_time DESC"])
    out = []
    for run in reversed(runs):
        item = StageRun(
            run.info.run_id, run.data.tags["stage"], run.info.status, run.info.start_time,
            dict(run.data.params), dict(run.data.metrics),
        )  # fmt: skip
        for name in curves:
            history = client.get_metric_history(run.info.run_id, name)
            item.curves[name] = sorted((m.step, m.value) for m in history)
        out.append(item)
    return out


def differing_params(runs: list[StageRun]) -> list[str]:
    """Params set on any run whose values are not all the same, KEY_PARAMS left out (always shown)."""
    names = sorted({name for run in runs for name in run.params} - set(KEY_PARAMS))
    differ = [n for n in names if len({run.params.get(n) for run in runs}) > 1]
    return differ[:MAX_DIFFERING]


def table_rows(runs: list[StageRun]) -> tuple[list[str], list[list[str]]]:
    """Columns and one row per run: identity, key and differing params, final metrics."""
    params = [p for p in KEY_PARAMS if any(p in run.params for run in runs)] + differing_params(runs)
    metrics = [m for m in FINAL_METRICS if any(m in run.metrics for run in runs)]
    columns = ["run", "status", *params, *metrics]
    rows = []
    for run in runs:
        values = [_number(run.metrics[m]) if m in run.metrics else "-" for m in metrics]
        rows.append([run.label, run.status, *(run.params.get(p, "-") for p in params), *values])
    return columns, rows


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def plot(runs: list[StageRun], metrics: tuple[str, ...], out: Path, title: str) -> Path:
    """One panel per metric, one line per run, against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    for ax, name in zip(axes[0], metrics, strict=True):
        for run in runs:
            points = run.curves.get(name) or []
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=run.label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
