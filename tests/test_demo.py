"""The offline demo (mmkd/demo.py) in a reduced size: every piece runs and results.json has its structure.

Whether distillation wins is measured by bench/demo_seeds.py (docs/results.md), not here: a few optimizer steps
say nothing about accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmkd.demo import MODELS, _split_world, demo_command, recipe_path, results_table
from mmkd.train.recipe import load_recipe

CATEGORIES = {"NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"}
TINY = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64, "vision_hidden": 16,
        "vision_layers": 1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    results = demo_command(out=str(out), seed=3, n=60, labelled=8, transfer=20, teacher_steps=2, dpt_steps=1,
                           sft_steps=1, dft_steps=2, batch=4, eval_batch_size=32, teacher_sizes={**TINY, "hidden": 48},
                           student_sizes=TINY)
    assert torch.get_num_threads() == threads  # the demo's one thread is restored
    return out, results


def test_results_json_structure(demo):
    out, results = demo
    page = (out / "report" / "index.html").read_text()  # the demo ends with the report of its three models
    assert all(name in page for name in MODELS) and "data:image/png;base64," in page
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) == {*MODELS, "setting"}
    test_size = on_disk["setting"]["world"]["test"]
    assert test_size == len(json.loads((out / "world" / "pid_splits.json").read_text())["test"]) == 12
    for name in MODELS:
        entry = on_disk[name]
        assert entry["headline"] == "generate"
        for mode in ("generate", "likelihood"):
            metrics = entry[mode]
            # METRICS are eval's metrics.json, unchanged
            assert metrics == json.loads((out / "eval" / name / f"test-{mode}" / "metrics.json").read_text())
            run = out / {"teacher": "teacher", "student_kd": "kd", "student_no_kd": "no_kd"}[name]
            stage = list(json.loads((run / "manifest.json").read_text())["stages"])[-1]
            assert metrics == json.loads((run / "eval" / stage / f"test-{mode}" / "metrics.json").read_text())
            assert metrics["mode"] == mode
            assert metrics["count"] == test_size
            assert set(metrics["categories"]) == CATEGORIES
            assert 0.0 <= metrics["accuracy"] <= 100.0
            skills = entry["skills"][mode]
            assert sum(s["count"] for s in skills.values()) == test_size
            assert sum(s["correct"] for s in skills.values()) == metrics["correct"]
        # likelihood mode always answers with a valid letter
        assert entry["likelihood"]["failed_parses"] == 0
        assert entry["parameters"] > 0
    assert on_disk["teacher"]["parameters"] > on_disk["student_kd"]["parameters"]
    assert on_disk["student_kd"]["parameters"] == on_disk["student_no_kd"]["parameters"]
    setting = on_disk["setting"]
    assert setting["steps"]["student_total"] == 4
    assert setting["examples_per_student"] == 16
    assert setting["world"]["labelled"] == 8 and setting["world"]["transfer"] == 20
    assert set(setting["seconds"]) >= {"teacher_fit", "student_kd_fit", "student_no_kd_fit", "total"}
    assert setting["threads"] == 1
    assert setting["world_options"] == "fixed_options" and setting["trained_parts"] == ["projector", "language_model"]


def test_fixed_world_and_white_centred_frozen_towers(demo):
    out, _ = demo
    problems = json.loads((out / "world" / "problems.json").read_text())
    colours = {tuple(p["choices"]) for p in problems.values() if p["skill"] == "Identify colours"}
    assert colours == {("red", "green", "blue", "yellow", "purple")}
    for kind in ("teacher", "student"):
        processor = json.loads((out / "models" / f"{kind}-vision" / "preprocessor_config.json").read_text())
        assert processor["image_mean"] == [1.0, 1.0, 1.0] and processor["image_std"] == [0.5, 0.5, 0.5]
    # the towers never moved: the trained teacher's vision weights equal the random initial ones
    from safetensors.torch import load_file

    initial = load_file(str(out / "models" / "teacher-vision" / "model.safetensors"))
    trained = load_file(str(next((out / "teacher" / "stages" / "train" / "student").glob("*.safetensors"))))
    patch = [k for k in trained if k.endswith("patch_embedding.weight")]
    assert len(patch) == 1
    assert torch.equal(trained[patch[0]], initial["embeddings.patch_embedding.weight"])


def test_pieces_ran_with_the_promised_steps(demo):
    out, _ = demo
    expected = {"teacher": {"train": 2}, "kd": {"dpt": 1, "sft": 1, "dft": 2}, "no_kd": {"dpt": 1, "sft": 1, "dft": 2}}
    for run, stages in expected.items():
        manifest = json.loads((out / run / "manifest.json").read_text())
        assert {k: (v["status"], v["global_step"]) for k, v in manifest["stages"].items()} == {
            k: ("done", steps) for k, steps in stages.items()
        }
    kd = json.loads((out / "kd" / "manifest.json").read_text())["stages"]
    # distillation terms were computed where the recipe asks for them, and only there
    assert {"train/mdist", "train/rdist"} <= set(kd["dpt"]["metrics"]) and "train/lm" not in kd["dpt"]["metrics"]
    assert {"train/lm", "train/mdist", "train/rdist"} <= set(kd["dft"]["metrics"])
    no_kd = json.loads((out / "no_kd" / "manifest.json").read_text())["stages"]
    assert all(not any("dist" in k for k in e["metrics"]) for e in no_kd.values())


def test_student_never_sees_test_or_transfer_answers(demo):
    out, _ = demo
    splits = json.loads((out / "world" / "pid_splits.json").read_text())
    truth = json.loads((out / "world" / "problems.json").read_text())
    test = set(splits["test"])
    assert not test & (set(splits["teacher"]) | set(splits["transfer"]))
    assert set(splits["labelled"]) <= set(splits["teacher"])
    assert not set(splits["teacher"]) & set(splits["transfer"])
    mine = json.loads((out / "student_data" / "problems.json").read_text())
    assert not test & set(mine)
    teacher_answers = {}
    for line in (out / "eval" / "teacher" / "transfer-likelihood" / "answers.jsonl").read_text().splitlines():
        row = json.loads(line)
        teacher_answers[str(row["question_id"])] = row["text"]
    for pid in splits["transfer"]:
        p = mine[pid]
        assert p["answer_source"] == "teacher" and p["solution"] == ""
        assert "ABCDE"[p["answer"]] == teacher_answers[pid]
    for pid in splits["labelled"]:
        assert mine[pid]["answer"] == truth[pid]["answer"]
    assert (out / "student_data" / "images").is_symlink()


def test_table_lists_every_model_in_both_modes(demo):
    _, results = demo
    table = results_table(results)
    assert "generate (headline)" in table and "likelihood" in table
    for name in MODELS:
        assert table.count(f"\n{name} ") == 2


def test_split_world_is_disjoint_and_keeps_test(tmp_path):
    world = tmp_path / "w"
    world.mkdir()
    original = {"train": [str(i) for i in range(1, 61)], "val": [str(i) for i in range(61, 81)],
                "test": [str(i) for i in range(81, 101)]}
    (world / "pid_splits.json").write_text(json.dumps(original))
    splits = _split_world(world, n_labelled=10, n_transfer=30, seed=0)
    assert splits["test"] == original["test"]
    assert len(splits["transfer"]) == 30 and len(splits["teacher"]) == 50 and len(splits["labelled"]) == 10
    assert not set(splits["transfer"]) & set(splits["teacher"])
    assert set(splits["labelled"]) <= set(splits["teacher"])
    with pytest.raises(ValueError, match="exceed the 80 non-test problems"):
        _split_world(world, n_labelled=10, n_transfer=75, seed=0)


def test_baseline_matches_the_kd_recipe_except_distillation():
    kd = load_recipe(recipe_path("demo_kd"))
    base = load_recipe(recipe_path("demo_no_kd"))
    assert kd.stage_names == base.stage_names == ["dpt", "sft", "dft"]
    assert kd.config["student"] == base.config["student"]
    assert base.config.get("teacher") is None
    for name in kd.stage_names:
        a, b = kd.stage(name), base.stage(name)
        for key in ("train", "optimizer", "schedule", "batch_size", "max_length", "trainer", "init_from"):
            assert getattr(a, key) == getattr(b, key), (name, key)
        assert b.weights == {"lm": 1.0}
        assert b.data.init_args["split"] == "labelled"
    assert kd.stage("dft").weights == {"lm": 1.0, "mdist": 1.0, "rdist": 1.0}
    teacher = load_recipe(recipe_path("teacher"))
    assert teacher.config.get("teacher") is None and teacher.stage("train").weights == {"lm": 1.0}


def test_the_paper_faithful_tiny_llava_kd_runs_on_the_demo_world(demo, tmp_path):
    """recipes/tiny/llava_kd.yaml (LLaVA-KD's terms: LM in DPT, raw-logit RDist, projector-only DPT) end to end."""
    from mmkd.train.runner import run_recipe

    out, _ = demo
    recipe = load_recipe(recipe_path("llava_kd"), ["--demo_root", str(out), "--run_dir", str(tmp_path / "run"),
                                                   "--batch", "4", "--dpt_steps", "1", "--sft_steps", "1",
                                                   "--dft_steps", "1", "--trainer.enable_progress_bar", "false"])
    assert recipe.stage("dpt").train == ("projector",) and recipe.stage("dpt").weights == {
        "lm": 1.0, "mdist": 1.0, "rdist": 1.0}
    manifest = run_recipe(recipe, echo=lambda _: None)
    for stage in ("dpt", "sft", "dft"):
        entry = manifest["stages"][stage]
        assert entry["status"] == "done" and entry["global_step"] == 1
        assert all(f"train/{o}" in entry["metrics"] for o in recipe.stage(stage).weights)
    demo_kd = load_recipe(recipe_path("demo_kd"))  # the demo's own recipe keeps the terms its figures rest on
    assert demo_kd.stage("dpt").weights == {"mdist": 1.0, "rdist": 1.0}
    assert demo_kd.stage("dpt").objectives[1].args == {"normalize": True}
