"""LLaVA-class teachers: loading from a save_pretrained folder, the output contract, quantised loading."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmkd.contract import ModelInputs
from mmkd.models import LlavaModel, ModelOutput


@pytest.fixture(scope="module")
def teacher(tiny_dirs) -> LlavaModel:
    return LlavaModel(str(tiny_dirs["llava-teacher"]))


def test_contract_shapes_and_logits_match_transformers(teacher: LlavaModel, batch) -> None:
    out = teacher(**batch, output_hidden_states=True)
    assert isinstance(out, ModelOutput)
    b, t = batch["input_ids"].shape
    assert out.last_hidden.shape == (b, t, 128)
    assert out.head_weight.shape == (len(teacher.tokenizer), 128)
    assert out.vision_features.shape == (2, 16, 128)
    assert out.visual_mask.dtype == torch.bool and out.visual_mask.sum(1).tolist() == [16, 16]
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    assert out.aux_loss is None
    with torch.no_grad():
        ref = teacher.hf(**batch).logits
    torch.testing.assert_close(out.logits(), ref, rtol=1e-5, atol=1e-5)
    # Chunked logits equal whole logits: objectives may compute them chunk by chunk.
    torch.testing.assert_close(out.logits(out.last_hidden[:, :5]), ref[:, :5], rtol=1e-5, atol=1e-5)


def test_image_attributes_and_preprocessing(teacher: LlavaModel) -> None:
    assert teacher.image_token == "<image>"
    assert teacher.image_token_id == teacher.tokenizer.convert_tokens_to_ids("<image>")
    assert teacher.num_image_tokens == 16
    assert teacher.tokenizer.pad_token is not None and teacher.tokenizer.chat_template
    pix = teacher.preprocess_images([Image.new("RGB", (64, 48), "red"), Image.new("L", (20, 20))])
    assert pix.shape == (2, 3, 32, 32)
    # The processor expands one <image> into exactly num_image_tokens tokens.
    enc = teacher.processor(text="<image> hi", images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    assert int((enc["input_ids"] == teacher.image_token_id).sum()) == 16


def test_generate_is_greedy_and_returns_new_tokens(teacher: LlavaModel, batch) -> None:
    one = {k: v[:1] for k, v in batch.items()}
    inputs = ModelInputs(one["input_ids"], one["attention_mask"], {"pixel_values": one["pixel_values"]})
    a = teacher.generate(inputs, max_new_tokens=5)
    b = teacher.generate(inputs, max_new_tokens=5)
    assert a.shape == (1, 5) and torch.equal(a, b)
    # Greedy: the first new token is the argmax of the last position's logits.
    last = int(one["attention_mask"].sum()) - 1
    out = teacher(one["input_ids"][:, : last + 1], one["attention_mask"][:, : last + 1], one["pixel_values"])
    assert int(a[0, 0]) == int(out.logits()[0, -1].argmax())


def test_parts_and_freeze(tiny_dirs, teacher: LlavaModel) -> None:
    from mmkd.contract import VIEW_PARTS

    parts = teacher.parts()
    assert list(parts) == ["vision_tower", "projector", "language_model", "ffn"]  # ffn: a view over the LM
    n = sum(p.numel() for name, ps in parts.items() if name not in VIEW_PARTS for p in ps)
    assert n == sum(p.numel() for p in teacher.parameters())
    t = LlavaModel(str(tiny_dirs["llava-teacher"])).freeze()  # a fresh copy: the module fixture stays trainable
    t.train()  # a LightningModule switching to train mode must not unfreeze the teacher
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_teacher_on_cpu(tiny_dirs, teacher: LlavaModel, batch, quantize: str) -> None:
    q = LlavaModel(str(tiny_dirs["llava-teacher"]), quantize=quantize).freeze()
    names = {type(m).__name__ for m in q.hf.model.language_model.modules()}
    assert ("Linear8bitLt" if quantize == "8bit" else "Linear4bit") in names
    q.train()
    assert not q.training
    out = q(**batch)
    assert not out.last_hidden.requires_grad  # no graph: the teacher gets no gradients
    ref = teacher(**batch).logits().detach()
    got = out.logits()
    assert got.shape == ref.shape
    # Quantisation error is small against the spread of the logits; greedy choices mostly agree.
    assert (got - ref).abs().mean() < 0.25 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7
    assert not any(p.requires_grad for p in q.parameters())
