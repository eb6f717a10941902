"""CLIP teachers and students through open_clip."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmkd.models import CLIPModel, CLIPOutput, ModelNotFoundError


def test_clip_contract_and_round_trip(tiny_dirs, tmp_path) -> None:
    teacher = CLIPModel(str(tiny_dirs["clip-teacher"])).eval()
    images = teacher.preprocess_images([Image.new("RGB", (50, 40), "red"), Image.new("RGB", (32, 32), "blue")])
    assert images.shape == (2, 3, 32, 32)
    tokens = teacher.tokenize(["a red square", "a blue circle"])
    assert tokens.shape == (2, 32)
    out = teacher(images, tokens)
    assert isinstance(out, CLIPOutput)
    assert out.image_embeds.shape == out.text_embeds.shape == (2, 64)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's initial temperature
    # Not normalised: the contract leaves that to the loss.
    assert not torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2))
    teacher.save_pretrained(tmp_path / "copy")
    back = CLIPModel.from_pretrained(tmp_path / "copy").eval()
    with torch.no_grad():
        again = back(images, tokens)
        torch.testing.assert_close(again.image_embeds, out.image_embeds.detach())
        torch.testing.assert_close(again.text_embeds, out.text_embeds.detach())


def test_clip_student_is_smaller_and_parts(tiny_dirs) -> None:
    teacher = CLIPModel(str(tiny_dirs["clip-teacher"]))
    student = CLIPModel(str(tiny_dirs["clip-student"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(student) < count(teacher)
    parts = student.parts()
    assert set(parts) == {"vision_tower", "text_tower", "logit_scale"}
    assert sum(p.numel() for ps in parts.values() for p in ps) == count(student)
    teacher.freeze().train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_clip_missing_models(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown open_clip architecture"):
        CLIPModel("ViT-Nope-1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="lacks open_clip_config.json"):
        CLIPModel(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="checkpoint file not found"):
        CLIPModel("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
