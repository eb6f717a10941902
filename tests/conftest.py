"""Shared fixtures: offline tiny assets (synthetic world + tiny model folders), built once per session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    """The assets of recipes/debug.yaml and recipes/tiny/ (world of 120 problems, tiny teacher, student parts)."""
    from mmkd.assets import prepare_tiny_assets

    return prepare_tiny_assets(tmp_path_factory.mktemp("tiny"), n=120, seed=0)


@pytest.fixture(scope="module")
def models(tiny_assets):
    """The tiny LLaVA-class teacher and a tiny MLLM student, loaded from their folders."""
    import torch

    from mmkd.models import LlavaModel, MLLMStudent

    teacher = LlavaModel(tiny_assets["teacher"])
    torch.manual_seed(0)  # the fresh projector: the same whichever tests ran before
    student = MLLMStudent(tiny_assets["student_vision"], tiny_assets["student_lm"], tokenizer=tiny_assets["tokenizer"])
    return teacher, student


@pytest.fixture(scope="module")
def sqa_batch(tiny_assets, models):
    """A collated training batch of 6 synthetic ScienceQA problems with the teacher's own inputs."""
    from mmkd.data import MultimodalCollator, ScienceQA

    teacher, student = models
    data = ScienceQA(tiny_assets["sqa"], "train")
    collate = MultimodalCollator.for_models(student, teacher, max_length=160)
    return collate([data[i] for i in range(6)])


@pytest.fixture(scope="session")
def make_module():
    """``make_module(student, teacher, weights, ...)``: the StageModule of a stage built the way the runner builds it
    (the task's objectives with their context, the recipe's optimizer and schedule settings)."""
    from mmkd.objectives import build_objective
    from mmkd.tasks import build_task
    from mmkd.train.recipe import OptimizerConfig, ScheduleConfig
    from mmkd.train.stage_module import StageModule

    def make(student, teacher, weights, objective_args=None, *, task="distill", task_args=None, train_parts=(),
             optimizer=None, schedule=None, total_steps=1, stage="stage"):
        objective_args = objective_args or {}
        objectives = {name: build_objective(name, objective_args.get(name), student=student, teacher=teacher,
                                            total_steps=total_steps) for name in weights}
        built = build_task(task, task_args, objectives, student=student, teacher=teacher)
        return StageModule(student, teacher, built, weights, list(train_parts),
                           optimizer=OptimizerConfig(**(optimizer or {})),
                           schedule=ScheduleConfig(**(schedule or {"warmup_ratio": 0.0})), total_steps=total_steps,
                           stage=stage)

    return make
