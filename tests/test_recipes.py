"""Every recipe in recipes/ parses; paper-scale recipes run 2 steps per stage with tiny models swapped in.

The paper-scale recipes keep every stage, objective, transform and schedule of the paper; only the models,
data paths, batch sizes and hardware keys are overridden so they fit a CPU in seconds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmkd.cli import main
from mmkd.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_recipe_resolves_and_builds_its_tasks(path):
    """Every stage resolves; its objectives and its task are built (with stand-in widths and step counts)."""
    from types import SimpleNamespace

    from mmkd.objectives import build_objective
    from mmkd.tasks import TASKS, build_task

    recipe = load_recipe(path)
    assert recipe.stage_names
    assert path.read_text().startswith("#"), "a recipe opens with a header: what it reproduces, hardware, metric"
    model = SimpleNamespace(hidden_size=8, embed_dim=8)  # the context objectives read from the models
    for name in recipe.stage_names:
        spec = recipe.stage(name)
        assert spec.train and spec.objectives and spec.task in TASKS
        objectives = {o.name: build_objective(o.name, o.args, student=model, teacher=model, total_steps=10)
                      for o in spec.objectives}
        task = build_task(spec.task, spec.task_args, objectives)
        assert list(task.objectives) == [o.name for o in spec.objectives]
        assert task.needs_teacher == spec.needs_teacher


@pytest.fixture(scope="module")
def onevision_teacher(tiny_assets, tmp_path_factory) -> str:
    """A tiny LLaVA-OneVision teacher (any-resolution tiling), the family of the paper recipes' teacher."""
    from mmkd.models.presets import build_tiny

    out = tmp_path_factory.mktemp("onevision") / "teacher"
    return str(build_tiny("onevision-teacher", str(out), tokenizer=tiny_assets["tokenizer"], seed=3))


def _tiny_overrides(recipe_path: Path, assets: dict, run_dir: Path, onevision: str | None = None) -> list[str]:
    """Swap in tiny models (a teacher of the recipe's family) and data; keep stages, objectives, transforms and
    schedules."""
    recipe = load_recipe(recipe_path)
    sqa = assets["sqa"]
    data = {
        "mmkd.data.CaptionPairs": {"class_path": "mmkd.data.CaptionPairs",
                                   "init_args": {"json_path": f"{sqa}/captions.json", "image_folder": f"{sqa}/images"}},
        "mmkd.data.LlavaConversations": {"class_path": "mmkd.data.ScienceQA",
                                         "init_args": {"root": sqa, "split": "train"}},
        "mmkd.data.PreferencePairs": {"class_path": "mmkd.data.PreferencePairs",
                                      "init_args": {"json_path": f"{sqa}/preference.json",
                                                    "image_folder": f"{sqa}/images"}},
    }
    args = ["--run_dir", str(run_dir), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.num_workers", "0", "--trainer.strategy", "auto"]
    if recipe.config["student"]["class_path"] == "mmkd.models.CLIPModel":
        models = Path(assets["root"]) / "models"
        args += ["--teacher", json.dumps({"class_path": "mmkd.models.CLIPModel",
                                          "init_args": {"arch": str(models / "clip-teacher")}}),
                 "--student", json.dumps({"class_path": "mmkd.models.CLIPModel",
                                          "init_args": {"arch": str(models / "clip-student")}})]
    else:
        teacher = (recipe.config.get("teacher") or {}).get("init_args", {}).get("path")
        if teacher is not None:
            teacher = onevision if onevision and "onevision" in teacher else assets["teacher"]
            args += ["--teacher", json.dumps({"class_path": "mmkd.models.LlavaModel", "init_args": {"path": teacher}})]
        args += ["--student", json.dumps({"class_path": "mmkd.models.MLLMStudent",
                                          "init_args": {"vision": assets["student_vision"],
                                                        "language_model": assets["student_lm"],
                                                        "tokenizer": assets["tokenizer"]}})]
    for name in recipe.stage_names:
        stage = recipe.config["stages"][name]
        args += [f"--stages.{name}.data", json.dumps(data.get(stage["data"]["class_path"], stage["data"])),
                 f"--stages.{name}.batch_size", "4", f"--stages.{name}.micro_batch_size", "4",
                 f"--stages.{name}.max_length", "192", f"--stages.{name}.trainer.strategy", "auto"]
    return args


PAPER = ["llava_kd.yaml", "llava_kd_onevision.yaml", "llava15_teacher.yaml", "llava_mod.yaml", "taid.yaml",
         "clip_kd.yaml"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_runs_two_steps_per_stage_with_tiny_models(name, tiny_assets, onevision_teacher, tmp_path):
    if name == "clip_kd.yaml":
        from mmkd.assets import prepare_tiny_assets

        tiny_assets = prepare_tiny_assets(tmp_path / "assets", n=60, seed=0, clip=True)
    run = tmp_path / "run"
    path = ROOT / "recipes" / name
    assert main(["fit", str(path), *_tiny_overrides(path, tiny_assets, run, onevision_teacher)]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    recipe = load_recipe(path)
    for stage in recipe.stage_names:
        entry = manifest["stages"][stage]
        assert entry["status"] == "done" and entry["global_step"] == 2, (stage, entry)
        for objective in recipe.stage(stage).weights:
            assert f"train/{objective}" in entry["metrics"], (stage, objective, sorted(entry["metrics"]))
        if "router" in recipe.stage(stage).train:  # the upcycled student's router loss reached the stage's loss
            assert entry["metrics"]["train/aux"] > 0, (stage, entry["metrics"])


def test_tiny_llava_mod_exports_an_moe_student_that_transformers_loads(tiny_assets, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    recipe = ROOT / "recipes" / "tiny" / "llava_mod.yaml"
    code = main(["fit", str(recipe), "--run-dir", str(run), "--data_root", tiny_assets["root"],
                 "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert [e["status"] for e in manifest["stages"].values()] == ["done"] * 4
    assert manifest["stages"]["sparse_mimic"]["metrics"]["train/aux"] > 0  # router loss reached the logs
    assert manifest["stages"]["preference"]["metrics"]["train/aux"] > 0
    assert "train/dpo_margin" in manifest["stages"]["preference"]["metrics"]
    assert main(["export", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2_moe"
    # LLaVA-MoD's placement and reduction: experts on layers 0, 2, ... (the tiny LM has 2 layers), losses summed
    assert config["text_config"]["mlp_only_layers"] == [1] and config["text_config"]["router_layer_reduction"] == "sum"
    # reload with transformers alone, in a process that never imports mmkd
    script = (
        "import sys, torch, transformers\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r})\n"
        f"p = AutoProcessor.from_pretrained({str(out)!r})\n"
        "ids = p.tokenizer('hello', return_tensors='pt').input_ids\n"
        "print(m(input_ids=ids).logits.shape[-1], 'mmkd' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vocab, imported = proc.stdout.split()
    assert int(vocab) > 0 and imported == "False"


@pytest.mark.parametrize("name", ["taid.yaml", "clip_kd.yaml"])
def test_tiny_paper_recipes_run_end_to_end(name, tiny_assets, tmp_path):
    """recipes/tiny/ with the papers' terms (LLaVA-MoD's: the test above; LLaVA-KD's: tests/test_demo.py)."""
    if name == "clip_kd.yaml":
        from mmkd.assets import prepare_tiny_assets

        tiny_assets = prepare_tiny_assets(tmp_path / "assets", n=60, seed=0, clip=True)
    run = tmp_path / "run"
    path = ROOT / "recipes" / "tiny" / name
    assert main(["fit", str(path), "--run-dir", str(run), "--data_root", tiny_assets["root"], "--trainer.max_steps",
                 "2", "--trainer.enable_progress_bar", "false"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    recipe = load_recipe(path)
    for stage in recipe.stage_names:
        entry = manifest["stages"][stage]
        assert entry["status"] == "done" and entry["global_step"] == 2
        assert all(f"train/{o}" in entry["metrics"] for o in recipe.stage(stage).weights)
    if name == "taid.yaml":  # TAID's t moved by the update its cross-entropy drove
        assert "train/taid_update" in manifest["stages"]["dft"]["metrics"]
        assert manifest["stages"]["dft"]["metrics"]["train/taid_t"] >= 0.4
    else:  # ICL was computed, and the clamp kept the student's logit scale in [0, ln 100]
        assert "train/clip_icl" in manifest["stages"]["distill"]["metrics"]
