"""`mixer compare EXPERIMENT`: an experiment's stage runs side by side (what differs in their settings, final
metrics, throughput) and their curves in one PNG, for those who would rather look than query MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Shown for every run, whether or not they differ: what people ask first about a stage.
KEY_PARAMS = ("model.variant", "stage.steps", "stage.micro_batch", "stage.optim.lr", "deepspeed.zero_stage")
FINAL_METRICS = ("train/loss", "eval/top1", "eval/top5", "train/img_per_s", "train/mfu")
MAX_DIFFERING = 12  # differing params shown beyond KEY_PARAMS (a row each), the first ones in name order


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
        return f"{self.stage} {self.run_id[:6]}"


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


# Metric column headers short enough for a terminal of 80 columns.
SHORT = {
    "train/loss": "loss",
    "eval/top1": "top-1",
    "eval/top5": "top-5",
    "train/img_per_s": "img/s",
    "train/mfu": "MFU",
}


def tables(runs: list[StageRun], width: int = 80) -> list[Any]:
    """The comparison as rich tables no wider than `width` (nothing cut, whatever the number of runs): the
    settings with one row per param and one column per run, in as many tables as the runs need, then the final
    metrics with one row per run."""
    from rich.table import Table

    columns, rows = table_rows(runs)
    split = next((i for i, c in enumerate(columns) if c in FINAL_METRICS), len(columns))
    params = columns[2:split]
    name_width = max([len("setting"), *map(len, params)]) + 3
    out, first = [], 0
    while first < len(rows):
        last, used = first, name_width + 1
        while last < len(rows):
            need = max(len(v) for v in (rows[last][0], rows[last][1], *rows[last][2:split])) + 3
            if last > first and used + need > width:
                break
            used, last = used + need, last + 1
        table = Table(title="settings" if first == 0 else None)
        table.add_column("setting", no_wrap=True)
        for row in rows[first:last]:
            table.add_column(row[0], justify="right", no_wrap=True)
        table.add_row("status", *(row[1] for row in rows[first:last]))
        for i, name in enumerate(params, start=2):
            table.add_row(name, *(row[i] for row in rows[first:last]))
        out.append(table)
        first = last
    if split < len(columns):
        results = Table(title="final metrics")
        for name in [columns[0], *columns[split:]]:
            results.add_column(SHORT.get(name, name), justify="left" if name == "run" else "right", no_wrap=True)
        for row in rows:
            results.add_row(row[0], *row[split:])
        out.append(results)
    return out


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def plot(runs: list[StageRun], metrics: tuple[str, ...], out: Path, title: str) -> Path:
    """One panel per metric, one line per run, against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig = figure(runs, metrics, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def figure(runs: list[StageRun], metrics: tuple[str, ...], title: str) -> Any:
    """The plot's figure: one colour per run in every panel, and every run in the legend, also a run with no
    point in the first panel (an eval stage has no train/loss)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {run.run_id: colours[i % len(colours)] for i, run in enumerate(runs)}
    for ax, name in zip(axes[0], metrics, strict=True):
        for run in runs:
            points = run.curves.get(name) or []
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, color=colour[run.run_id])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour[run.run_id], label=run.label) for run in runs]
    rows = -(-len(runs) // 4)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.4, 0.06 + 0.06 * rows), 1, 1))
    return fig
