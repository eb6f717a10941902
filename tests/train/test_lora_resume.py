"""LoRA and QLoRA versions of recipes/tiny/llava_kd.yaml end to end on CPU with the tiny assets: a kill mid-stage
resumes bit-exact, checkpoints hold only the adapters and the projector, the export is a merged plain transformers
folder whose logits equal the merged in-memory student's, and ``--adapter-only`` writes peft's adapter folder.

Every run is a real ``mmkd fit`` in a subprocess (a kill must take the whole process down); fault injection
(``MMKD_FAULT=kill:STAGE:STEP``) lands the kill at an exact step.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
LORA = ROOT / "recipes" / "tiny" / "llava_kd_lora.yaml"
QLORA = ROOT / "recipes" / "tiny" / "llava_kd_qlora.yaml"
STEPS = {"dpt": 2, "sft": 2, "dft": 4}
# r=8 adapters on every linear layer of the tiny LM (2 layers; q 64->64, k and v 64->32, o 64->64, gate and up
# 64->128, down 128->64): 8 * (in + out) each, plus the projector in full (48->64 and 64->64 with biases).
LM_ADAPTERS = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
PROJECTOR = 48 * 64 + 64 + 64 * 64 + 64


def overrides(assets: dict, run_dir: Path) -> list[str]:
    """The recipe with the tiny assets' models and data, 2-4 steps per stage, a checkpoint every 2 steps."""
    sqa = {"class_path": "mmkd.data.ScienceQA", "init_args": {"root": assets["sqa"], "split": "train"}}
    args = ["--run-dir", str(run_dir), "--trainer.enable_progress_bar", "false", "--trainer.checkpoint_every_n_steps",
            "2", "--trainer.log_every_n_steps", "1",
            "--teacher", json.dumps({"class_path": "mmkd.models.LlavaModel", "init_args": {"path": assets["teacher"]}}),
            "--student", json.dumps({"class_path": "mmkd.models.MLLMStudent", "init_args": {
                "vision": assets["student_vision"], "language_model": assets["student_lm"],
                "tokenizer": assets["tokenizer"]}})]
    for stage, steps in STEPS.items():
        args += [f"--stages.{stage}.data", json.dumps(sqa), f"--stages.{stage}.batch_size", "4",
                 f"--stages.{stage}.max_length", "192", f"--stages.{stage}.trainer.max_steps", str(steps)]
    return args


def fit(recipe: Path, run_dir: Path, assets: dict, *extra: str, fault: str | None = None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("MMKD_FAULT", None)
    if fault:
        env["MMKD_FAULT"] = fault
    cmd = [sys.executable, "-m", "mmkd", "fit", str(recipe), *overrides(assets, run_dir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def student_tensors(run_dir: Path, stage: str = "dft") -> dict:
    out = {}
    for f in sorted((run_dir / "stages" / stage / "student").glob("*.safetensors")):
        out.update(load_file(f))
    assert out
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def checkpoint_keys(run_dir: Path, stage: str) -> list[str]:
    path = run_dir / manifest(run_dir)["stages"][stage]["checkpoint"]
    return sorted(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])


@pytest.fixture(scope="module")
def lora_run(tiny_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    proc = fit(LORA, run, tiny_assets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def test_lora_recipe_runs_and_prints_trainable_parameters_per_stage(lora_run):
    run, proc = lora_run
    m = manifest(run)
    assert [(s, e["status"], e["global_step"]) for s, e in m["stages"].items()] == [
        ("dpt", "done", 2), ("sft", "done", 2), ("dft", "done", 4)]
    counts = {s: e["parameters"] for s, e in m["stages"].items()}
    assert counts["dpt"]["parts"] == {"projector": PROJECTOR}
    for stage in ("sft", "dft"):
        assert counts[stage]["parts"] == {"projector": PROJECTOR, "language_model": LM_ADAPTERS}
        assert counts[stage]["total"] == counts["dpt"]["total"] + LM_ADAPTERS  # the adapters are extra tensors
        line = f"; {PROJECTOR + LM_ADAPTERS:,} of {counts[stage]['total']:,} student parameters train"
        assert any(x.startswith(f"stage {stage}: ") and line in x for x in proc.stdout.splitlines())
    assert "train/mdist" in m["stages"]["dft"]["metrics"]


def test_lora_checkpoints_hold_only_adapters_and_the_projector(lora_run):
    run, _ = lora_run
    keys = checkpoint_keys(run, "dft")
    adapters = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    projector = [k for k in keys if "multi_modal_projector" in k and "lora_" not in k]
    assert len(adapters) == 2 * 14 and len(projector) == 4  # A and B on 7 layers x 2 blocks; 2 weights, 2 biases
    assert sorted(adapters + projector) == keys  # nothing else: no frozen base weight, no vision tower
    assert all(k.startswith("student.hf.model.language_model.") for k in adapters)


def test_lora_stage_folders_are_merged_plain_folders(lora_run):
    run, _ = lora_run
    for stage in ("sft", "dft"):
        tensors = student_tensors(run, stage)
        assert not [k for k in tensors if "lora_" in k or "base_layer" in k]
        assert not (run / "stages" / stage / "student" / "adapter_config.json").exists()
    # the adapters changed the LM: the merged dft student differs from the sft student it started from
    before, after = student_tensors(run, "sft"), student_tensors(run, "dft")
    q = next(k for k in after if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(before[q], after[q])
    vision = next(k for k in after if "vision_tower" in k and k.endswith("weight"))
    assert torch.equal(before[vision], after[vision])  # frozen


def test_lora_resumes_bit_exact_after_a_kill(lora_run, tiny_assets, tmp_path):
    reference, _ = lora_run
    run = tmp_path / "run"
    killed = fit(LORA, run, tiny_assets, fault="kill:dft:3")
    assert killed.returncode == -signal.SIGKILL
    m = manifest(run)
    assert m["stages"]["sft"]["status"] == "done" and m["stages"]["dft"]["status"] == "running"
    assert m["stages"]["dft"]["checkpoint"].endswith("step-00000002.ckpt")
    resumed = fit(LORA, run, tiny_assets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage dft: resuming from step-00000002.ckpt" in resumed.stdout
    assert_same(student_tensors(run), student_tensors(reference))


_PLAIN = r"""
import sys, torch
from transformers import AutoModelForImageTextToText
from peft import PeftModel
folder, batch_file, out_file, base, adapter = sys.argv[1:]
batch = torch.load(batch_file)
with torch.no_grad():
    merged = AutoModelForImageTextToText.from_pretrained(folder).eval()(**batch).logits
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter).eval()
    adapted = model(**batch).logits
torch.save({"merged": merged, "adapted": adapted, "mmkd": any(m.startswith("mmkd") for m in sys.modules)}, out_file)
"""


def test_lora_export_is_a_merged_student_with_the_in_memory_logits(lora_run, tmp_path):
    from mmkd.cli import main
    from mmkd.train.checkpoints import load_stage_checkpoint
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import Runner

    run, _ = lora_run
    out, adapter = tmp_path / "export", tmp_path / "adapter"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(adapter), "--adapter-only"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and len(config["target_modules"]) == 14
    base = Path(config["base_model_name_or_path"])
    assert base.resolve() == (run / "stages" / "sft" / "student").resolve()
    # the merged in-memory student: dft's starting student with the last checkpoint's adapters, merged
    recipe = load_recipe(run / "recipe.yaml", ["--run_dir", str(run)])
    student = load_stage_checkpoint(Runner(recipe).build_student("dft"),
                                    run / manifest(run)["stages"]["dft"]["checkpoint"], recipe.stage("dft").train)
    merged = student.merged().eval()
    ids = torch.tensor([[1, 5, 9, 14, 2, 7, 30, 11]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = merged.hf(**batch).logits
        unmerged = student.eval().hf(**batch).logits
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "plain.py").write_text(_PLAIN)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(out), str(tmp_path / "batch.pt"),
                           str(tmp_path / "out.pt"), str(base), str(adapter)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert not got["mmkd"]
    assert torch.equal(got["merged"], expected)  # the exported folder is exactly the merged weights
    torch.testing.assert_close(got["adapted"], unmerged, rtol=0, atol=1e-5)  # peft's own reload of the adapters
    torch.testing.assert_close(expected, unmerged, rtol=0, atol=1e-4)  # merging changes only rounding


@pytest.mark.slow  # QLoRA in make test: tests/models/test_lora.py (4-bit layers, merge); LoRA resume above
def test_qlora_recipe_runs_resumes_bit_exact_and_exports_a_float_student(tiny_assets, tmp_path):
    from mmkd.cli import main

    reference, run, out = tmp_path / "reference", tmp_path / "run", tmp_path / "export"
    proc = fit(QLORA, reference, tiny_assets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = manifest(reference)
    assert m["stages"]["dft"]["parameters"]["parts"] == {"projector": PROJECTOR, "language_model": LM_ADAPTERS}
    assert re.search(r"stage sft: .*; 23,680 of [\d,]+ student parameters train", proc.stdout)
    assert sorted(k for k in checkpoint_keys(reference, "dft") if "lora_" not in k) == sorted(
        f"student.hf.model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("bias", "weight"))
    killed = fit(QLORA, run, tiny_assets, fault="kill:dft:3")
    assert killed.returncode == -signal.SIGKILL
    resumed = fit(QLORA, run, tiny_assets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage dft: resuming from step-00000002.ckpt" in resumed.stdout
    assert_same(student_tensors(run), student_tensors(reference))
    assert main(["export", str(reference), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tensors = student_tensors(reference)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert not [k for k in tensors if "lora_" in k or "base_layer" in k or "absmax" in k or "quant" in k]
