"""Tiny models and batches for the LightningModule tests (loaded from real folders)."""

import pytest


@pytest.fixture(scope="module")
def models(tiny_assets):
    from mmkd.models import LlavaModel, MLLMStudent

    teacher = LlavaModel(tiny_assets["teacher"])
    student = MLLMStudent(tiny_assets["student_vision"], tiny_assets["student_lm"], tokenizer=tiny_assets["tokenizer"])
    return teacher, student


@pytest.fixture(scope="module")
def sqa_batch(tiny_assets, models):
    from mmkd.data import MultimodalCollator, ScienceQA

    teacher, student = models
    data = ScienceQA(tiny_assets["sqa"], "train")
    collate = MultimodalCollator.for_models(student, teacher, max_length=160)
    return collate([data[i] for i in range(6)])
