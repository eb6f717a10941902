"""The runner end to end on recipes/debug.yaml: resume after SIGKILL, failures, NaN, recipe changes.

Every run is a real ``mmkd fit`` in a subprocess (a kill must take the whole process down). Fault injection
(``MMKD_FAULT=kind:stage:step``) makes the interruptions land at exact steps without timing races.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "debug.yaml"


def fit(run_dir: Path, assets: dict, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MMKD_FAULT", None)
    if fault:
        env["MMKD_FAULT"] = fault
    cmd = [sys.executable, "-m", "mmkd", "fit", str(RECIPE), "--run-dir", str(run_dir), "--data_root",
           assets["root"], "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def student_tensors(run_dir: Path, stage: str = "sft") -> dict:
    folder = run_dir / "stages" / stage / "student"
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {folder}"
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (a[k] == b[k]).all(), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = fit(run, tiny_assets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_uninterrupted_run_writes_run_directory(reference):
    m = manifest(reference)
    assert [s["status"] for s in m["stages"].values()] == ["done", "done"]
    assert m["stages"]["sft"]["global_step"] == 4
    assert m["mmkd_version"] and "torch" in m["packages"] and "hardware" in m
    assert (reference / "recipe.yaml").is_file()
    assert (reference / "stages" / "distill" / "student" / "config.json").is_file()
    assert (reference / "stages" / "distill" / "logs" / "metrics.csv").is_file()
    ckpts = sorted(p.name for p in (reference / "stages" / "sft" / "checkpoints").glob("step-*.ckpt"))
    assert ckpts == ["step-00000002.ckpt", "step-00000004.ckpt"]
    assert m["stages"]["sft"]["checkpoint"].endswith("step-00000004.ckpt")
    # the distillation stage really distilled: its KL term was logged
    assert "train/kl" in m["stages"]["distill"]["metrics"]


def test_sigkill_mid_stage_two_resumes_bit_exact(reference, tiny_assets, tmp_path):
    run = tmp_path / "run"
    killed = fit(run, tiny_assets, fault="kill:sft:3")
    assert killed.returncode == -signal.SIGKILL
    m = manifest(run)
    assert m["stages"]["distill"]["status"] == "done"
    assert m["stages"]["sft"]["status"] == "running"
    assert m["stages"]["sft"]["checkpoint"].endswith("step-00000002.ckpt")
    resumed = fit(run, tiny_assets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage distill: done, skipped" in resumed.stdout
    assert "stage sft: resuming from step-00000002.ckpt" in resumed.stdout
    assert manifest(run)["stages"]["sft"]["status"] == "done"
    assert_same_weights(student_tensors(run), student_tensors(reference))


def test_sigkill_during_checkpoint_write_resumes_bit_exact(reference, tiny_assets, tmp_path):
    run = tmp_path / "run"
    killed = fit(run, tiny_assets, fault="kill_in_checkpoint:sft:4")
    assert killed.returncode == -signal.SIGKILL
    ckpt_dir = run / "stages" / "sft" / "checkpoints"
    assert (ckpt_dir / ".tmp-step-00000004.ckpt").exists()  # the half-done write is there ...
    assert manifest(run)["stages"]["sft"]["checkpoint"].endswith("step-00000002.ckpt")  # ... but not in use
    resumed = fit(run, tiny_assets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage distill: done, skipped" in resumed.stdout
    assert not list(ckpt_dir.glob(".tmp-*"))
    assert_same_weights(student_tensors(run), student_tensors(reference))


def test_failing_stage_is_marked_failed_and_retried(reference, tiny_assets, tmp_path):
    run = tmp_path / "run"
    failed = fit(run, tiny_assets, fault="raise:sft:3")
    assert failed.returncode == 1
    assert "stage sft failed: RuntimeError: injected failure at step 3" in failed.stderr
    entry = manifest(run)["stages"]["sft"]
    assert entry["status"] == "failed" and entry["error"] == "RuntimeError: injected failure at step 3"
    assert entry["checkpoint"].endswith("step-00000002.ckpt")
    retried = fit(run, tiny_assets)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert manifest(run)["stages"]["sft"]["status"] == "done"
    assert manifest(run)["stages"]["sft"]["attempts"] == 2
    assert_same_weights(student_tensors(run), student_tensors(reference))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_assets, tmp_path):
    run = tmp_path / "run"
    proc = fit(run, tiny_assets, fault="nan:distill:3")
    assert proc.returncode == 1
    assert "stage distill" in proc.stderr and "'lm'" in proc.stderr and "at step 3" in proc.stderr
    entry = manifest(run)["stages"]["distill"]
    assert entry["status"] == "failed" and "NonFiniteLossError" in entry["error"]
    names = sorted(p.name for p in (run / "stages" / "distill" / "checkpoints").iterdir())
    assert names == ["step-00000002.ckpt"]
    assert entry["checkpoint"].endswith("step-00000002.ckpt")
    assert manifest(run)["stages"]["sft"]["status"] == "pending"


def test_recipe_changes_on_resume(reference, tiny_assets, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "manifest.json").read_bytes()
    refused = fit(run, tiny_assets, "--stages.sft.optimizer.lr", "0.1")
    assert refused.returncode == 2
    assert "stages.sft.optimizer.lr" in refused.stderr and "--restart-from" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (run / "manifest.json").read_bytes() == before  # untouched
    accepted = fit(run, tiny_assets, "--trainer.log_every_n_steps", "3")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    changes = manifest(run)["changes"]
    # the copy lives in another folder, so run_dir changed too: both are execution keys, recorded
    assert changes and changes[-1]["keys"] == ["run_dir", "trainer.log_every_n_steps"]
    restarted = fit(run, tiny_assets, "--stages.sft.optimizer.lr", "0.1", "--restart-from", "sft")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "stage distill: done, skipped" in restarted.stdout
    assert list((run / "archive").glob("*/sft"))  # the old stage was kept, not deleted
    assert manifest(run)["stages"]["sft"]["status"] == "done"


def test_a_bad_name_against_a_finished_run_changes_nothing(reference, tiny_assets, tmp_path):
    """An invalid strategy used to pass against a finished run (nothing left to run) and rewrite the manifest."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in (run / "manifest.json", run / "recipe.yaml")}
    proc = fit(run, tiny_assets, "--trainer.strategy", "dpp")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "trainer.strategy: unknown strategy 'dpp'" in proc.stderr
    assert {p.name: p.read_bytes() for p in (run / "manifest.json", run / "recipe.yaml")} == before


@pytest.fixture(scope="module")
def llava_student(tiny_assets, tmp_path_factory) -> str:
    """A plain transformers LLaVA folder (what `mmkd export` writes), to train as `mmkd.models.LlavaModel`."""
    from mmkd.models.presets import build_tiny

    out = tmp_path_factory.mktemp("llava-student") / "student"
    return str(build_tiny("mllm-student", str(out), tokenizer=tiny_assets["tokenizer"], seed=5))


@pytest.mark.slow  # a LlavaModel student across stages: tests/models/test_qwen_vl.py (DPT/SFT/DFT); kill: above
def test_a_llava_model_student_runs_two_stages_and_resumes_after_a_kill(tiny_assets, llava_student, tmp_path):
    """Any LLaVA-class model can be the student: the runner reloads it between stages with its own class."""
    student = ("--student", json.dumps({"class_path": "mmkd.models.LlavaModel", "init_args": {"path": llava_student}}))
    ref = fit(tmp_path / "ref", tiny_assets, *student)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert [s["status"] for s in manifest(tmp_path / "ref")["stages"].values()] == ["done", "done"]
    run = tmp_path / "run"
    killed = fit(run, tiny_assets, *student, fault="kill:sft:3")
    assert killed.returncode == -signal.SIGKILL
    resumed = fit(run, tiny_assets, *student)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage sft: resuming from step-00000002.ckpt" in resumed.stdout
    assert_same_weights(student_tensors(run), student_tensors(tmp_path / "ref"))
    config = json.loads((run / "stages" / "sft" / "student" / "config.json").read_text())
    assert config["model_type"] == "llava"
