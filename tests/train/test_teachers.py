"""Teachers are loaded once for the stages that need them and released before a stage that does not."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from mmkd.train.recipe import load_recipe
from mmkd.train.runner import Runner
from mmkd.train.teachers import TeacherPool

ROOT = Path(__file__).resolve().parents[2]


def _three_stage_recipe(tmp_path: Path) -> Path:
    """recipes/debug.yaml with a third stage: distill (teacher) -> sft (none) -> dft (teacher again)."""
    raw = yaml.safe_load((ROOT / "recipes" / "debug.yaml").read_text())
    raw["stages"]["dft"] = copy.deepcopy(raw["stages"]["distill"])
    path = tmp_path / "recipe.yaml"
    path.write_text("# debug.yaml with a second distillation stage after SFT\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def test_teacher_is_gone_during_a_teacher_free_stage_and_back_equal_after(tiny_assets, tmp_path):
    recipe = load_recipe(_three_stage_recipe(tmp_path), ["--run_dir", str(tmp_path / "run"), "--data_root",
                                                         tiny_assets["root"], "--trainer.max_steps", "1",
                                                         "--trainer.enable_progress_bar", "false"])
    seen: dict[str, object] = {}

    def spy(message: str) -> None:  # the runner's progress messages mark each stage's start, after its models exist
        if "optimizer steps of" not in message:  # the stage's size line
            return
        stage = message.split(":")[0].removeprefix("stage ")
        gc.collect()
        teacher = runner.teachers.loaded
        seen[stage] = {"teacher": teacher is not None,
                       "first_alive": seen["distill"]["ref"]() is not None if seen else None}
        if stage == "distill":
            seen[stage]["ref"] = weakref.ref(teacher)
            seen[stage]["state"] = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
            seen[stage]["params"] = sum(p.numel() for p in teacher.parameters())
        elif stage == "dft":
            seen[stage]["state"] = {k: v.detach().clone() for k, v in teacher.state_dict().items()}

    runner = Runner(recipe, echo=spy)
    manifest = runner.run()
    assert [e["status"] for e in manifest["stages"].values()] == ["done"] * 3
    assert seen["distill"]["teacher"] and seen["distill"]["params"] > 0
    # during SFT no teacher is held, and the one the first stage used has been freed
    assert not seen["sft"]["teacher"] and seen["sft"]["first_alive"] is False
    # the third stage has a teacher again, loaded anew, with exactly the weights of the first
    assert seen["dft"]["teacher"] and runner.teachers.loads == 2
    first, again = seen["distill"]["state"], seen["dft"]["state"]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # the teacher-free stage trained without one: its objective is the LM loss alone
    assert "train/kl" not in manifest["stages"]["sft"]["metrics"] and "train/kl" in manifest["stages"]["dft"]["metrics"]


def test_pool_loads_once_and_reloads_a_partitioned_teacher():
    built = []

    def load():
        built.append(torch.nn.Linear(2, 2))
        return built[-1]

    pool = TeacherPool(load)
    assert pool.loaded is None and pool.get() is pool.get() and pool.loads == 1  # lazily, once
    pool.release(needed_later=True)  # on the CPU there is no accelerator to park it off: it is freed
    assert pool.loaded is None
    assert pool.get() is built[-1] and pool.loads == 2
    built[-1].weight.ds_id = 0  # what a ZeRO-3 stage leaves behind: partitions
    assert pool.get() is not built[0] and pool.loads == 3
    assert TeacherPool(None).get() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="parking a teacher off the accelerator needs a GPU")
def test_a_teacher_on_an_accelerator_is_parked_in_host_memory_and_restored():
    teacher = torch.nn.Linear(64, 64).cuda()
    weights = teacher.weight.detach().cpu().clone()
    pool = TeacherPool(lambda: teacher)
    pool.get()
    before = torch.cuda.memory_allocated()
    pool.release(needed_later=True)
    assert pool.loaded is teacher and teacher.weight.device.type == "cpu"
    assert torch.cuda.memory_allocated() < before
    assert pool.get() is teacher and teacher.weight.device.type == "cuda" and pool.loads == 1
    assert torch.equal(teacher.weight.detach().cpu(), weights)
