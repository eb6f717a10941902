"""DeepSpeed checkpoint folders: no teacher and no frozen parameters inside, consolidation, resume after SIGKILL."""

import signal

import pytest
import torch
from dist_helpers import STEPS, fit, manifest, student

from mmkd.train.checkpoints import load_stage_checkpoint, load_student_state


def _model_states(ckpt):
    files = sorted((ckpt / "checkpoint").glob("*model_states.pt"))
    assert len(files) == 2, files  # one per rank under ZeRO-3
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def test_zero3_checkpoint_holds_neither_teacher_nor_frozen_parts(zero3_run):
    ckpt = zero3_run / manifest(zero3_run)["stages"]["distill"]["checkpoint"]
    assert ckpt.is_dir() and ckpt.name == f"step-{STEPS:08d}.ckpt" and (ckpt / "latest").is_file()
    for states in _model_states(ckpt):
        names = set(states["module"]) | {n for shapes in states["param_shapes"] for n in shapes}
        assert not [n for n in names if "teacher" in n]
        assert not [n for n in names if "vision_tower" in n]  # frozen in this stage: rebuilt from init_from
        assert [n for n in names if "projector" in n] and [n for n in names if "language_model" in n]


def test_load_student_state_consolidates_zero3_shards(zero3_run):
    ckpt = zero3_run / manifest(zero3_run)["stages"]["distill"]["checkpoint"]
    from mmkd.models import MLLMStudent

    state = load_student_state(ckpt)
    final = MLLMStudent.from_pretrained(str(zero3_run / "stages" / "distill" / "student")).state_dict()
    assert state and all(k in final for k in state)
    assert not [k for k in state if "vision_tower" in k]  # frozen: left out of the checkpoint
    for k, v in state.items():
        assert v.dtype == torch.float32 and torch.equal(v, final[k].float()), k


def test_zero3_resumes_after_sigkill(zero3_run, tiny_assets, zero_config, tmp_path):
    run = tmp_path / "run"
    killed = fit(run, tiny_assets, 2, "deepspeed_stage_3", zero_config=zero_config, fault=f"kill:distill:{STEPS}")
    assert killed.returncode == -signal.SIGKILL
    entry = manifest(run)["stages"]["distill"]
    assert entry["status"] == "running" and entry["checkpoint"].endswith("step-00000002.ckpt")
    resumed = fit(run, tiny_assets, 2, "deepspeed_stage_3", zero_config=zero_config)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage distill: resuming from step-00000002.ckpt" in resumed.stdout
    assert manifest(run)["stages"]["distill"]["status"] == "done"
    ours, ref = student(run), student(zero3_run)
    assert ours.keys() == ref.keys()
    for k in ref:  # optimizer partitions, step, RNG and data position restored: the same weights, bit for bit
        assert torch.equal(ours[k], ref[k]), k


def test_load_stage_checkpoint_rebuilds_frozen_parts_from_init_from(zero3_run):
    """What `mmkd export` of an unfinished DeepSpeed stage needs: checkpoint (trained parts) + init_from (frozen)."""
    from mmkd.models import MLLMStudent
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import Runner

    recipe = load_recipe(zero3_run / "recipe.yaml", ["--run_dir", str(zero3_run)])
    ckpt = zero3_run / manifest(zero3_run)["stages"]["distill"]["checkpoint"]
    rebuilt = load_stage_checkpoint(Runner(recipe).build_student("distill"), ckpt, recipe.stage("distill").train)
    final = MLLMStudent.from_pretrained(str(zero3_run / "stages" / "distill" / "student")).state_dict()
    ours = rebuilt.state_dict()
    assert ours.keys() == final.keys()
    for k in final:
        assert torch.equal(ours[k].float(), final[k].float()), k
    with pytest.raises(ValueError, match="does not fit"):  # a frozen-in-checkpoint claim for a trained part fails
        load_stage_checkpoint(Runner(recipe).build_student("distill"), ckpt, ["projector", "vision_tower"])


def test_ddp_resume_restores_each_ranks_own_rng(tiny_assets, tmp_path):
    """With dropout the ranks' random streams part (their sequences differ in length), so a resumed run must give
    every rank its own saved RNG state, not rank 0's, to end with the uninterrupted run's weights."""
    import json
    import shutil

    lm = tmp_path / "lm-dropout"
    shutil.copytree(tiny_assets["student_lm"], lm)
    config = json.loads((lm / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (lm / "config.json").write_text(json.dumps(config))
    args = ("--student", json.dumps({"class_path": "mmkd.models.MLLMStudent", "init_args": {
        "vision": tiny_assets["student_vision"], "language_model": str(lm), "tokenizer": tiny_assets["tokenizer"],
        "attn_implementation": "eager"}}))
    ref = fit(tmp_path / "ref", tiny_assets, 2, "ddp", *args)
    assert ref.returncode == 0, ref.stderr[-4000:]
    run = tmp_path / "run"
    killed = fit(run, tiny_assets, 2, "ddp", *args, fault=f"kill:distill:{STEPS}")
    assert killed.returncode == -signal.SIGKILL
    resumed = fit(run, tiny_assets, 2, "ddp", *args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from step-00000002.ckpt" in resumed.stdout
    ours, want = student(run), student(tmp_path / "ref")
    assert all(torch.equal(ours[k], want[k]) for k in want), [k for k in want if not torch.equal(ours[k], want[k])]
