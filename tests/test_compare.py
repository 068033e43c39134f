"""`mixer compare`: stage runs in a real MLflow store, side by side, and their curves as a PNG."""

import io

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipeline.compare import figure, stage_runs, table_rows, tables
from tests.conftest import run_mixer


def _stage_run(client, experiment_id, stage, lr, losses, top1):
    run = client.create_run(experiment_id, tags={"stage": stage}).info.run_id
    params = {"stage.steps": str(len(losses)), "stage.optim.lr": lr, "data.num_workers": "2", "seed": "0"}
    client.log_batch(run, params=[Param(k, v) for k, v in params.items()])
    metrics = [Metric("train/loss", loss, 0, step + 1) for step, loss in enumerate(losses)]
    client.log_batch(run, metrics=[*metrics, Metric("eval/top1", top1, 0, len(losses))])
    client.set_terminated(run)
    return run


def test_compare_lists_stage_runs_with_their_differences_and_plots_their_curves(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    client.create_run(experiment, tags={"kind": "experiment"})  # the parent run: not a stage, not listed
    first = _stage_run(client, experiment, "pretrain", "0.001", [2.0, 1.5, 1.2], 0.61)
    second = _stage_run(client, experiment, "pretrain", "0.003", [2.0, 1.4, 1.0], 0.66)
    _stage_run(client, experiment, "finetune", "0.01", [1.1, 0.9], 0.8)

    runs = stage_runs(client, "cmp", "pretrain", curves=("train/loss",))
    assert [r.run_id for r in runs] == [first, second]  # oldest first
    assert runs[1].curves["train/loss"] == [(1, 2.0), (2, 1.4), (3, 1.0)]
    columns, rows = table_rows(runs)
    assert "stage.optim.lr" in columns and "data.num_workers" not in columns  # the same everywhere: left out
    assert rows[0][columns.index("stage.optim.lr")] == "0.001" and rows[1][columns.index("eval/top1")] == "0.66"

    png = tmp_path / "out" / "cmp.png"
    result = run_mixer("compare", "cmp", "--uri", uri, "--png", str(png), "--metrics", "train/loss", "eval/top1")
    assert result.returncode == 0, result.stderr
    assert "finetune" in result.stdout and "pretrain" in result.stdout and "0.003" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    missing = run_mixer("compare", "nope", "--uri", uri)
    assert missing.returncode == 2 and "no MLflow experiment named 'nope'" in missing.stderr


def _three_stages(tmp_path):
    """A demo-like experiment: pretrain and finetune with many differing settings, and an eval stage that logged
    no training curve."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("wide", artifact_location=(tmp_path / "art").as_uri())
    settings = {
        "pretrain": {"stage.optim.warmup_steps": "30", "stage.augment.crop_scale": "[0.6, 1.0]",
                     "stage.checkpoint_every": "150", "stage.eval_every": "150", "stage.dataset": "shapes",
                     "stage.optim.weight_decay": "0.05", "model.variant": "B/16", "deepspeed.zero_stage": "2"},
        "finetune": {"stage.optim.warmup_steps": "15", "stage.augment.crop_scale": "[0.6, 1.0]",
                     "stage.init_from": "pretrain", "stage.dataset": "novel_shapes", "stage.optim.name": "sgd",
                     "stage.optim.weight_decay": "0.0", "model.variant": "B/16", "deepspeed.zero_stage": "2"},
        "eval": {"stage.init_from": "finetune", "stage.dataset": "novel_shapes", "model.variant": "B/16"},
    }  # fmt: skip
    for stage, params in settings.items():
        run = client.create_run(experiment, tags={"stage": stage}).info.run_id
        client.log_batch(run, params=[Param(k, v) for k, v in params.items()])
        metrics = [Metric("eval/top1", 0.9587, 0, 300), Metric("eval/top5", 1.0, 0, 300)]
        if stage != "eval":
            metrics += [Metric("train/loss", 2.0 - 0.001 * s, 0, s) for s in range(1, 300, 10)]
            metrics += [Metric("train/img_per_s", 12345.6, 0, 300), Metric("train/mfu", 0.4321, 0, 300)]
        client.log_batch(run, metrics=metrics)
        client.set_terminated(run)
    return client


@pytest.mark.parametrize("width", [80, 120])
def test_compare_tables_fit_a_terminal_without_cutting_a_column_name(tmp_path, width):
    runs = stage_runs(_three_stages(tmp_path), "wide", curves=("train/loss",))
    runs = runs * 3  # nine runs: more than one settings table holds at these widths
    console = Console(width=width, file=io.StringIO(), record=True)
    for table in tables(runs, width):
        console.print(table)
    text = console.export_text()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= width
    for name in ("model.variant", "deepspeed.zero_stage", "stage.optim.warmup_steps", "stage.augment.crop_scale",
                 "loss", "top-1", "img/s", "MFU", "novel_shapes", "12,346", "0.4321"):  # fmt: skip
        assert name in text, (name, text)
    for run in runs:  # every run has a column of settings and a row of metrics
        assert text.count(run.label) == 2 * 3, run.label


def test_every_stage_is_in_the_plots_legend_also_one_without_the_first_curve(tmp_path):
    runs = stage_runs(_three_stages(tmp_path), "wide", curves=("train/loss", "eval/top1"))
    fig = figure(runs, ("train/loss", "eval/top1"), "wide")
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert sorted(label.split()[0] for label in labels) == ["eval", "finetune", "pretrain"]
