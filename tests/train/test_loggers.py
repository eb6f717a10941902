"""Recipe loggers (mmkd/train/stage.py's ``build_logger``) on recipes/debug.yaml, both stages, read back for real.

A ``class_path`` logger keeps one run per recipe under ``RUN/logs/<logger>/`` with every stage's keys prefixed by
its name, beside each stage's CSV file; the values it holds must be the CSV file's, step for step. MLflow and W&B
runs go through a subprocess (both keep process-wide state; a kill must take the whole process down).
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmkd.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "debug.yaml"
STAGES = ("distill", "sft")


def _args(run: Path, assets: dict, logger: dict, *extra: str) -> list[str]:
    return ["fit", str(RECIPE), "--run-dir", str(run), "--data_root", assets["root"], "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", json.dumps(logger), *extra]


def _fit(run: Path, assets: dict, logger: dict, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_", "MMKD_FAULT"))}
    env["PYTHONWARNINGS"] = "ignore"
    if fault:
        env["MMKD_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mmkd", *_args(run, assets, logger, *extra)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def csv_losses(run: Path, stage: str) -> dict[int, float]:
    """``train/loss`` by step from the stage's metrics.csv (the last row of a step wins, as after a resume)."""
    with open(run / "stages" / stage / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def flat_recipe(run: Path) -> dict[str, str]:
    """The resolved recipe.yaml's leaves by dotted key, as MLflow stores parameters (strings, at most 250 chars; an
    empty mapping has no leaf)."""
    import yaml

    def walk(value, prefix=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix, str(value)[:250]

    return dict(walk(yaml.safe_load((run / "recipe.yaml").read_text())))


def test_tensorboard_holds_both_stages_in_one_run_folder(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(_args(run, tiny_assets, {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"})) == 0
    folder = run / "logs" / "tensorboard"
    assert [p for p in folder.iterdir() if p.is_dir()] == []  # no version_N folder per stage
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one event file per stage, one run
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    for stage in STAGES:
        expected = csv_losses(run, stage)
        assert sorted(expected) == [0, 1]
        logged = {e.step: e.value for e in events.Scalars(f"{stage}-train/loss")}
        assert logged.keys() == expected.keys()
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6)  # float32 in the event file
    assert "distill-train/kl" in events.Tags()["scalars"] and "sft-train/kl" not in events.Tags()["scalars"]
    import yaml

    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert hparams["stages.sft.optimizer.lr"] == 5.0e-4 and hparams["stages.distill.objectives.kl"] == 1.0
    assert json.loads((run / "logs" / "tensorboard.json").read_text()) == {"hyperparameters_logged": True}


def _mlflow(run: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when asked to
    client = MlflowClient(tracking_uri=f"file:{run / 'logs' / 'mlflow'}")
    experiment = client.get_experiment_by_name("mmkd")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run for the whole recipe
    return client, runs[0]


def _assert_history_is_csv(client, run_id: str, run: Path) -> None:
    """Each stage's ``train/loss`` history in the MLflow run holds the CSV file's values at the CSV file's steps (a
    resumed stage's CSV file restarts at its checkpoint, the MLflow run keeps the steps logged before the kill)."""
    for stage in STAGES:
        expected = csv_losses(run, stage)
        assert expected
        logged = {m.step: m.value for m in client.get_metric_history(run_id, f"{stage}-train/loss")}
        assert {step: logged.get(step) for step in expected} == pytest.approx(expected, rel=1e-12)


MLFLOW = {"class_path": "lightning.pytorch.loggers.MLFlowLogger"}


def test_mlflow_holds_both_stages_in_one_run_with_the_recipe_as_parameters(tiny_assets, tmp_path, monkeypatch):
    run = tmp_path / "run"
    proc = _fit(run, tiny_assets, MLFLOW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, found = _mlflow(run, monkeypatch)
    state = json.loads((run / "logs" / "mlflow.json").read_text())
    assert state == {"run_id": found.info.run_id, "hyperparameters_logged": True}
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    _assert_history_is_csv(client, found.info.run_id, run)
    for stage in STAGES:
        assert [m.step for m in client.get_metric_history(found.info.run_id, f"{stage}-train/loss")] == [0, 1]
    assert found.data.params == flat_recipe(run)  # the whole resolved recipe, not a stage's own values
    assert found.data.params["stages.sft.optimizer.lr"] == "0.0005"


def test_mlflow_run_continues_after_a_kill(tiny_assets, tmp_path, monkeypatch):
    run = tmp_path / "run"
    every_step = ("--trainer.checkpoint_every_n_steps", "1")  # so sft resumes from a checkpoint, not from scratch
    killed = _fit(run, tiny_assets, MLFLOW, *every_step, fault="kill:sft:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_id = json.loads((run / "logs" / "mlflow.json").read_text())["run_id"]
    _, before = _mlflow(run, monkeypatch)
    assert before.info.run_id == run_id and before.info.status == "RUNNING"
    resumed = _fit(run, tiny_assets, MLFLOW, *every_step)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage sft: resuming from step-00000001.ckpt" in resumed.stdout
    client, after = _mlflow(run, monkeypatch)
    assert after.info.run_id == run_id and after.info.status == "FINISHED"
    assert json.loads((run / "logs" / "mlflow.json").read_text())["run_id"] == run_id
    # Step 0 from the killed attempt (killed after step 1, before logging it), step 1 from the resumed one.
    assert [m.step for m in client.get_metric_history(run_id, "sft-train/loss")] == [0, 1]
    _assert_history_is_csv(client, run_id, run)
    assert after.data.params == flat_recipe(run)


def _wandb_rows(folder: Path) -> tuple[list[dict], set[str], set[str]]:
    """History rows, config keys and run ids recorded in the offline run files (wandb's own record reader)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    rows, config, ids = [], set(), set()
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif kind == "config":
                config |= {i.key for i in record.config.update}
            elif kind == "run":
                ids.add(record.run.run_id)
    return rows, config, ids


@pytest.mark.slow  # the one-run/prefix/hyper-parameter mechanics are the TensorBoard and MLflow tests'
def test_wandb_offline_holds_both_stages_in_one_run(tiny_assets, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    proc = _fit(run, tiny_assets, {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                   "init_args": {"offline": True}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, config, ids = _wandb_rows(run / "logs" / "wandb")
    assert ids == {json.loads((run / "logs" / "wandb.json").read_text())["id"]}  # one run, the recorded id
    for stage in STAGES:
        logged = {r["trainer/global_step"]: r[f"{stage}-train/loss"] for r in rows if f"{stage}-train/loss" in r}
        assert logged == pytest.approx(csv_losses(run, stage), rel=1e-12)
    assert "stages.sft.optimizer.lr" in config and "seed" in config


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        ({"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"run_nam": "x"}},
         "trainer.logger.init_args.run_nam: unknown argument"),
        ({"class_path": "lightning.pytorch.loggers.NoSuchLogger"}, "trainer.logger.class_path: cannot import"),
        ({"init_args": {"name": "x"}}, "trainer.logger: expected true, false or a class_path/init_args mapping"),
    ],
)
def test_bad_logger_settings_are_one_line_exit_2(logger, message, tiny_assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(run, tiny_assets, logger)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmkd: error: ") and err.count("\n") == 1 and message in err, err
    assert not run.exists()
