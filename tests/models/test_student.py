"""MLLM students built from parts: plain transformers Llava underneath, parts by name, towers by kind."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from mmkd.models import CLIPModel, MLLMStudent, ModelNotFoundError
from mmkd.models.towers import open_clip_visual_to_hf, timm_vit_to_hf


@pytest.fixture(scope="module")
def student(tiny_dirs) -> MLLMStudent:
    return MLLMStudent.from_pretrained(tiny_dirs["mllm-student"])


def test_student_is_transformers_llava_with_contract(student: MLLMStudent, batch) -> None:
    assert isinstance(student.hf, LlavaForConditionalGeneration)
    assert student.num_image_tokens == 16 and student.image_token == "<image>"
    out = student(**batch, output_hidden_states=True)
    b, t = batch["input_ids"].shape
    assert out.last_hidden.shape == (b, t, 64)
    assert out.vision_features.shape == (2, 16, 64)
    assert out.visual_mask.sum().item() == 32 and out.aux_loss is None
    torch.testing.assert_close(out.logits(), student.hf(**batch).logits, rtol=1e-5, atol=1e-5)


def test_parts_by_name_cover_every_parameter_once(student: MLLMStudent) -> None:
    from mmkd.contract import VIEW_PARTS

    parts = student.parts()
    assert list(parts) == ["vision_tower", "projector", "language_model", "ffn"]  # ffn: a view over the LM
    ids = [id(p) for name, ps in parts.items() if name not in VIEW_PARTS for p in ps]
    assert len(ids) == len(set(ids)) == len(list(student.parameters()))
    assert {p.shape for p in parts["projector"]} == {(64, 48), (64,), (64, 64)}


def test_build_from_parts_and_round_trip(tmp_path, tokenizer_dir, batch) -> None:
    from mmkd.models.presets import PRESET_SIZES, write_vision_and_lm

    vision, lm = write_vision_and_lm(tmp_path / "parts", tokenizer_dir, dict(PRESET_SIZES["mllm-student"]))
    s = MLLMStudent(vision, lm, tokenizer=tokenizer_dir, gradient_checkpointing=True, attn_implementation="eager")
    assert s.hf.config.vision_feature_select_strategy == "default" and s.hf.config.vision_feature_layer == -2
    assert s.hf.config.text_config._attn_implementation == "eager"
    # Gradient checkpointing still gives gradients to the trainable parts.
    s.train()
    for p in s.parts()["vision_tower"]:
        p.requires_grad_(False)
    out = s(**batch)
    out.logits().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in s.parts()["projector"])
    s.save_pretrained(tmp_path / "saved")
    back = MLLMStudent.from_pretrained(tmp_path / "saved")
    s.eval()
    with torch.no_grad():
        # Same weights; only the attention kernel differs (eager here, transformers' default after reloading).
        torch.testing.assert_close(back(**batch).logits(), s(**batch).logits(), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(back.hf.state_dict().values(), s.hf.state_dict().values()))


def test_tokenizer_without_image_token_gets_one(tmp_path, batch) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmkd.models.presets import PRESET_SIZES, write_vision_and_lm

    # A plain LM tokenizer: no <image>, no pad token, no chat template.
    words = ["<unk>", "</s>", "describe", "the", "image", "."]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "t")
    vision, lm = write_vision_and_lm(tmp_path / "parts", str(tmp_path / "t"), dict(PRESET_SIZES["mllm-student"]))
    s = MLLMStudent(vision, lm, tokenizer=str(tmp_path / "t"))
    assert s.image_token_id == len(words) == s.tokenizer.convert_tokens_to_ids("<image>")
    assert s.hf.get_input_embeddings().num_embeddings == len(s.tokenizer) == len(words) + 1
    assert s.tokenizer.pad_token == "</s>" and s.tokenizer.chat_template
    ids = torch.tensor([[s.image_token_id] * 16 + [2, 3, 4]])
    out = s(ids, torch.ones_like(ids), batch["pixel_values"][:1])
    assert out.visual_mask.sum().item() == 16 and out.head_weight.shape[0] == len(words) + 1


def test_open_clip_tower_converts_one_to_one(tiny_dirs, tokenizer_dir, tmp_path, batch) -> None:
    clip = CLIPModel(str(tiny_dirs["clip-student"]))
    visual = clip.model.visual.eval()
    hf = open_clip_visual_to_hf(visual, where="test")
    images = batch["pixel_values"]
    with torch.no_grad():
        pooled = hf(pixel_values=images).pooler_output @ visual.proj
        torch.testing.assert_close(pooled, visual(images), rtol=1e-5, atol=1e-5)
    from mmkd.models.presets import PRESET_SIZES, write_vision_and_lm

    _, lm = write_vision_and_lm(tmp_path / "parts", tokenizer_dir, dict(PRESET_SIZES["mllm-student"]))
    s = MLLMStudent(f"open_clip:{tiny_dirs['clip-student']}", lm, tokenizer=tokenizer_dir)
    assert s.num_image_tokens == 16
    assert s(**batch).vision_features.shape == (2, 16, 64)


def test_timm_clip_layout_vit_converts_one_to_one() -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_base_patch16_clip_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
    ).eval()
    hf = timm_vit_to_hf(vit, where="test")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # timm's final norm applied to all tokens equals HF's post_layernorm on the last hidden states.
        torch.testing.assert_close(
            hf.post_layernorm(hf(pixel_values=x).last_hidden_state),
            vit.forward_features(x),
            rtol=1e-5,
            atol=1e-5,
        )
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="only CLIP-layout timm ViTs"):
        timm_vit_to_hf(plain, where="timm:vit_tiny_patch16_224")


def test_bad_projector_and_missing_parts(tiny_dirs, tmp_path) -> None:
    with pytest.raises(ValueError, match="projector='linear'"):
        MLLMStudent("x", "y", projector="linear")
    with pytest.raises(ModelNotFoundError, match="vision=.*no such folder"):
        MLLMStudent(str(tmp_path / "nope"), str(tiny_dirs["mllm-student"]))


def test_text_only_batch_keeps_the_vision_path_in_the_graph(student: MLLMStudent, tokenizer_dir) -> None:
    """A micro-batch without images still gives the tower and projector (zero) gradients, values unchanged."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor([tok("Which shape?")["input_ids"]])
    mask = torch.ones_like(ids)
    student.train()
    out = student(ids, mask)
    with torch.no_grad():
        plain = student.hf(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out.logits(), plain, atol=1e-6)
    out.logits().sum().backward()
    text_only = {n: p.grad for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    # with an image, the same parameters get gradients (the last tower layer is unused: feature layer -2)
    image_ids = torch.tensor([[student.image_token_id] * student.num_image_tokens + ids[0].tolist()])
    student(image_ids, torch.ones_like(image_ids), torch.randn(1, 3, 32, 32)).logits().sum().backward()
    vision = {n for n, p in student.named_parameters() if ".vision_tower." in n or ".multi_modal_projector." in n}
    used = {n for n in vision if dict(student.named_parameters())[n].grad is not None}
    assert used and any("multi_modal_projector" in n for n in used)
    assert all(text_only[n] is not None and not text_only[n].any() for n in used)
    assert all(text_only[n] is None for n in vision - used)
    student.zero_grad(set_to_none=True)
    student.eval()


@pytest.mark.parametrize("kind", ["mllm-student", "moe-student", "llava-teacher", "onevision-teacher"])
def test_text_only_batch_calls_the_same_modules_in_the_same_order(kind, tiny_dirs, tokenizer_dir) -> None:
    """ZeRO-3 gathers parameters module by module and prefetches by the traced order: a rank with a text-only
    micro-batch must call exactly the modules, parents included, that a rank with an image calls, in that order.
    (Qwen2-MoE experts are one module holding every expert, so routing does not change the order.)"""
    from transformers import AutoTokenizer

    from mmkd.models import LlavaModel

    teacher = kind.endswith("teacher")
    model = LlavaModel(str(tiny_dirs[kind])) if teacher else MLLMStudent.from_pretrained(tiny_dirs[kind])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor([tok("Which shape is it?")["input_ids"]])
    h, w = model.image_size
    image = Image.new("RGB", (w, h), (200, 30, 90))
    image_ids = torch.tensor([[model.image_token_id] * model.image_token_count(image) + ids[0].tolist()])
    calls: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_pre_hook(lambda m, a: calls.append(names[m])) for m in names]
    orders = []
    for batch in ({"input_ids": image_ids, **model.image_inputs([image])}, {"input_ids": ids}):
        calls.clear()
        model(attention_mask=torch.ones_like(batch["input_ids"]), **batch)  # with gradients: the anchor runs
        orders.append(list(calls))
    for handle in handles:
        handle.remove()
    with_image, text_only = orders
    assert any("vision_tower" in n for n in with_image) and any("multi_modal_projector" in n for n in with_image)
    assert text_only == with_image
