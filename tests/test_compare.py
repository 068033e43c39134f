"""`mixer compare`: stage runs in a real MLflow store, side by side, and their curves as a PNG."""

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.compare import stage_runs, table_rows
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
