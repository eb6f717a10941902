"""Any-resolution teachers (LLaVA-OneVision layout): per-image visual-token counts and image sizes end to end."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmkd.data import MultimodalCollator
from mmkd.models import LlavaModel, MLLMStudent

SIZES = [(32, 32), (64, 32), (90, 50), (40, 64)]  # (width, height)


@pytest.fixture(scope="module")
def onevision(tiny_dirs) -> LlavaModel:
    return LlavaModel(str(tiny_dirs["onevision-teacher"]))


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_counts_follow_the_processor_and_depend_on_the_image(onevision: LlavaModel) -> None:
    counts = []
    for i, size in enumerate(SIZES):
        image = _image(size, i)
        enc = onevision.processor(text=onevision.image_token, images=[image], return_tensors="pt")
        counts.append(onevision.image_token_count(image))
        assert counts[-1] == int((enc["input_ids"] == onevision.image_token_id).sum())
    assert len(set(counts)) > 1, counts  # any-resolution tiling: not one fixed count
    assert set(onevision.image_inputs([_image(SIZES[0], 0)])) >= {"pixel_values", "image_sizes"}


def test_distillation_batch_with_an_any_resolution_teacher(onevision: LlavaModel, tiny_dirs, make_module) -> None:
    student = MLLMStudent.from_pretrained(tiny_dirs["mllm-student"])
    records = [
        {"id": f"r{i}", "images": [_image(size, i)],
         "messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                      {"role": "assistant", "content": f"colour number {i}"}]}
        for i, size in enumerate(SIZES)
    ]
    records.append({"id": "text", "messages": [{"role": "user", "content": "Say yes."},
                                               {"role": "assistant", "content": "yes"}]})
    batch = MultimodalCollator.for_models(student, onevision, max_length=400)(records)
    teacher_inputs = batch.teacher_inputs
    assert teacher_inputs.images["image_sizes"].tolist() == [[h, w] for w, h in SIZES]
    visual = (teacher_inputs.input_ids == onevision.image_token_id).sum(1).tolist()
    assert visual == [onevision.image_token_count(r["images"][0]) for r in records[:-1]] + [0]
    assert (batch.inputs.input_ids == student.image_token_id).sum(1).tolist() == [16] * len(SIZES) + [0]
    # the same answer tokens on both sides
    for s_labels, t_labels in zip(batch.labels, batch.teacher_labels):
        assert s_labels[s_labels != -100].tolist() == t_labels[t_labels != -100].tolist()
    # transformers checks that the image tokens match the image features: the teacher's forward is the test
    out = onevision(**teacher_inputs.kwargs())
    assert out.visual_mask.sum(1).tolist() == visual
    module = make_module(student, onevision, {"lm": 1.0, "kl": 1.0, "mdist": 1.0, "rdist": 1.0},
                         train_parts=["projector", "language_model"], total_steps=1)
    terms = module.compute_losses(batch)
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["rdist"]) > 0
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parts()["projector"])


def test_a_2x2_tiled_teacher_pairs_only_its_base_grid(onevision: LlavaModel, tiny_dirs) -> None:
    """LLaVA-KD's visual terms with an any-resolution teacher compare each image's base grid (the tiles have no
    student counterpart): checked against an explicit computation on the first 16 tokens of each teacher image."""
    import torch.nn.functional as F

    from mmkd.objectives import MDistObjective, RDistObjective

    student = MLLMStudent.from_pretrained(tiny_dirs["mllm-student"])
    big = _image((64, 64), 7)  # 64x64 on 32-pixel tiles: the base image, then a 2x2 tiling
    records = [{"id": "big", "images": [big], "messages": [{"role": "user", "content": "<image>\\nColour?"},
                                                             {"role": "assistant", "content": "red"}]}]
    batch = MultimodalCollator.for_models(student, onevision, max_length=400)(records)
    with torch.no_grad():
        s_out = student(**batch.inputs.kwargs())
        t_out = onevision(**batch.teacher_inputs.kwargs())
    assert t_out.image_base_tokens == 16 == s_out.image_base_tokens
    t_pos = t_out.visual_mask[0].nonzero().flatten()
    assert len(t_pos) > 4 * 16  # base grid + four tiles (+ newline tokens)
    s_pos = s_out.visual_mask[0].nonzero().flatten()
    s_logits = s_out.logits(s_out.last_hidden[0, s_pos]).float()
    t_logits = t_out.logits(t_out.last_hidden[0, t_pos[:16]]).float()  # the base grid: the first 16
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
    visual = MDistObjective(response_weight=0.0, visual_weight=1.0)(s_out, t_out, batch)
    torch.testing.assert_close(visual, kl, rtol=1e-4, atol=1e-6)
    gram_s, gram_t = s_logits @ s_logits.t(), t_logits @ t_logits.t()
    rel = 1 - F.cosine_similarity(gram_s.flatten(), gram_t.flatten(), dim=0)
    torch.testing.assert_close(RDistObjective()(s_out, t_out, batch), rel, rtol=1e-4, atol=1e-6)
