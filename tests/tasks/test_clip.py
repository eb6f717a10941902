"""The CLIP task: the teacher's similarities reach the student; the teacher gets no gradient."""

import copy
import math

import pytest


def test_clip_distillation_step(tmp_path, make_module):
    from mmkd.data import CaptionPairs
    from mmkd.data.clip import CLIPCollator
    from mmkd.data.synth import synth_sqa
    from mmkd.models import CLIPModel
    from mmkd.models.presets import build_tiny

    synth_sqa(tmp_path / "sqa", 40, 0, tokenizer=False)
    teacher = CLIPModel(str(build_tiny("clip-teacher", str(tmp_path / "t"), tokenizer="", seed=0)))
    student = CLIPModel(str(build_tiny("clip-student", str(tmp_path / "s"), tokenizer="", seed=1)))
    data = CaptionPairs(tmp_path / "sqa" / "captions.json", tmp_path / "sqa" / "images")
    batch = CLIPCollator.for_models(student, teacher)([data[i] for i in range(6)])
    assert batch.images.shape[0] == 6 and batch.text.shape[0] == 6
    module = make_module(student, teacher, {"clip_kd": 1.0}, {"clip_kd": {"kd_weight": 1.0, "embedding_weight": 1.0}},
                         task="clip", train_parts=["vision_tower", "text_tower", "logit_scale"])
    terms = module.compute_losses(batch)
    assert terms["clip_kd"] > 0
    assert set(terms) >= {"clip_kd", "clip_similarity", "clip_contrastive", "clip_embedding", "loss"}
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parts()["vision_tower"])
    # a student identical to its teacher has nothing left to learn from the similarity term
    same = make_module(copy.deepcopy(teacher), teacher, {"clip_kd": 1.0},
                       {"clip_kd": {"kd_weight": 1.0, "contrastive_weight": 0.0}}, task="clip",
                       train_parts=["vision_tower"])
    terms = same.compute_losses(batch)
    assert float(terms["clip_similarity"]) < 1e-6 and float(terms["clip_kd"]) < 1e-6


def test_unreadable_records_give_a_zero_weight_stand_in(tmp_path, make_module):
    """A micro-batch of unreadable records still runs student and teacher (multi-rank runs need every rank's step)."""
    from mmkd.data.clip import CLIPCollator
    from mmkd.models import CLIPModel
    from mmkd.models.presets import build_tiny

    teacher = CLIPModel(str(build_tiny("clip-teacher", str(tmp_path / "t"), tokenizer="", seed=0)))
    student = CLIPModel(str(build_tiny("clip-student", str(tmp_path / "s"), tokenizer="", seed=1)))
    batch = CLIPCollator.for_models(student, teacher)([None, None])
    assert batch.standin and batch.data_stats == {"samples": 0, "bad": 2}
    assert batch.images.shape[0] == 1 and batch.teacher_images.shape[0] == 1
    module = make_module(student, teacher, {"clip_kd": 1.0}, task="clip", train_parts=["vision_tower"])
    terms = module.compute_losses(batch)
    assert all(math.isfinite(float(v)) for v in terms.values())
    (terms["loss"] * 0.0).backward()
    assert all(p.grad is None or not p.grad.any() for p in student.parts()["vision_tower"])


def test_the_students_logit_scale_is_clamped_after_each_step(tmp_path, make_module):
    """open_clip and CLIP-KD clamp the student's (log) logit scale to [0, ln 100] after every optimizer step."""
    import lightning as L
    import torch

    from mmkd.data import CaptionPairs
    from mmkd.data.clip import CLIPCollator
    from mmkd.data.synth import synth_sqa
    from mmkd.models import CLIPModel
    from mmkd.models.presets import build_tiny

    synth_sqa(tmp_path / "sqa", 40, 0, tokenizer=False)
    teacher = CLIPModel(str(build_tiny("clip-teacher", str(tmp_path / "t"), tokenizer="", seed=0)))
    student = CLIPModel(str(build_tiny("clip-student", str(tmp_path / "s"), tokenizer="", seed=1)))
    data = CaptionPairs(tmp_path / "sqa" / "captions.json", tmp_path / "sqa" / "images")
    batch = CLIPCollator.for_models(student, teacher)([data[i] for i in range(6)])
    with torch.no_grad():
        student.model.logit_scale.fill_(9.0)  # exp(9) = 8103: beyond CLIP's cap of 100
    module = make_module(student, teacher, {"clip_kd": 1.0}, {"clip_kd": {"icl_weight": 1.0}}, task="clip",
                         train_parts=["logit_scale"], total_steps=1, optimizer={"name": "sgd", "lr": 1e-3})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    assert float(student.model.logit_scale) == pytest.approx(math.log(100))
    assert "train/clip_icl" in trainer.callback_metrics  # the ICL term ran, with its own scale in the optimizer
    icl = module.objectives["clip_kd"].loss.icl_logit_scale
    assert any(icl is p for g in trainer.optimizers[0].param_groups for p in g["params"])
