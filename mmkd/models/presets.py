"""Tiny random models for tests and the demo, built through the same code as real ones.

Each preset writes a real model folder with ``save_pretrained``; ``LlavaModel``, ``MLLMStudent.from_pretrained``
and ``CLIPModel`` then load it by path, exactly as they load a hub id. Defaults give 32x32 images with 8x8
patches (16 visual tokens) and 2-layer models a few hundred thousand parameters large: seconds on a CPU.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

KINDS = ("llava-teacher", "onevision-teacher", "qwen-vl-teacher", "qwen-vl-student", "mllm-student", "moe-student",
         "clip-teacher", "clip-student")

# Per-kind default sizes; any of them can be overridden through build_tiny(**sizes).
PRESET_SIZES: dict[str, dict[str, Any]] = {
    "llava-teacher": {
        "image_size": 32,
        "patch_size": 8,
        "vision_hidden": 64,
        "vision_layers": 2,
        "hidden": 128,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 256,
    },
    "mllm-student": {
        "image_size": 32,
        "patch_size": 8,
        "vision_hidden": 48,
        "vision_layers": 2,
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 128,
    },
    "moe-student": {
        "image_size": 32,
        "patch_size": 8,
        "vision_hidden": 48,
        "vision_layers": 2,
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 128,
        "num_experts": 4,
        "top_k": 2,
        "every": 1,
    },
    "clip-teacher": {
        "image_size": 32,
        "patch_size": 8,
        "vision_hidden": 64,
        "vision_layers": 2,
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "embed_dim": 64,
        "context_length": 32,
    },
    "clip-student": {
        "image_size": 32,
        "patch_size": 8,
        "vision_hidden": 32,
        "vision_layers": 1,
        "hidden": 32,
        "layers": 1,
        "heads": 2,
        "embed_dim": 64,
        "context_length": 32,
    },
}

# LLaVA-OneVision layout (SigLIP tower, any-resolution tiling on a grid of 32-pixel tiles up to 64x64), sized as the
# LLaVA teacher: its visual-token count depends on each image's size, as the paper recipes' teacher's does.
PRESET_SIZES["onevision-teacher"] = dict(PRESET_SIZES["llava-teacher"])
# Qwen2.5-VL layout (a windowed ViT whose 2x2 patch merger is the projector, 3-D rotary positions, visual-token
# counts that follow each image's size): 4-pixel patches merged 2x2, so a 32x32 image gives 16 visual tokens as the
# other presets do, and a 64x32 one 32.
PRESET_SIZES["qwen-vl-teacher"] = {**PRESET_SIZES["llava-teacher"], "patch_size": 4}
PRESET_SIZES["qwen-vl-student"] = {**PRESET_SIZES["mllm-student"], "patch_size": 4}
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def tiny_clip_config(**sizes: Any) -> dict[str, Any]:
    """An open_clip model config (the ``model_cfg`` of ``open_clip_config.json``) for a tiny ViT CLIP."""
    s = {**PRESET_SIZES["clip-teacher"], **sizes}
    return {
        "embed_dim": s["embed_dim"],
        "vision_cfg": {
            "image_size": s["image_size"],
            "layers": s["vision_layers"],
            "width": s["vision_hidden"],
            "head_width": s["vision_hidden"] // s["heads"],
            "patch_size": s["patch_size"],
        },
        "text_cfg": {
            "context_length": s["context_length"],
            "vocab_size": 49408,
            "width": s["hidden"],
            "heads": s["heads"],
            "layers": s["layers"],
        },
    }


def write_vision_and_lm(tmp: Path, tokenizer: str, s: dict[str, Any]) -> tuple[str, str]:
    """Write a random HF CLIP vision tower and a random Qwen2 LM sized for ``tokenizer`` into ``tmp``."""
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=s["vision_hidden"],
            intermediate_size=4 * s["vision_hidden"],
            num_hidden_layers=s["vision_layers"],
            num_attention_heads=s["heads"],
            image_size=s["image_size"],
            patch_size=s["patch_size"],
            projection_dim=s["vision_hidden"],
            hidden_act="quick_gelu",
        )
    )
    vision.save_pretrained(tmp / "vision")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    lm = Qwen2ForCausalLM(_qwen2_config(tok, s, 512))
    lm.save_pretrained(tmp / "lm")
    return str(tmp / "vision"), str(tmp / "lm")


def _qwen2_config(tok: Any, s: dict[str, Any], max_positions: int) -> Qwen2Config:
    """A tiny Qwen2 LM config sized by ``s`` for tokenizer ``tok``."""
    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=s.get("tie", False),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )

def build_tiny(kind: str, out_dir: str, *, tokenizer: str, seed: int = 0, **sizes: Any) -> Path:
    """Write a tiny random model of ``kind`` to ``out_dir`` and return the folder.

    Args:
        kind: One of ``llava-teacher``, ``onevision-teacher``, ``mllm-student``, ``moe-student``, ``clip-teacher``,
            ``clip-student``.
        out_dir: Folder to write (created).
        tokenizer: Tokenizer folder with an ``<image>`` token, shared by teacher and students (CLIP kinds use
            open_clip's own tokenizer and ignore it).
        seed: Seed of the random initialisation.
        **sizes: Overrides of the kind's default sizes (``hidden``, ``layers``, ``image_size``, ``num_experts``...).

    Returns:
        ``Path(out_dir)``, loadable by ``LlavaModel`` (the teachers), ``MLLMStudent.from_pretrained``
        (students; also by ``LlavaModel``) or ``CLIPModel`` (clip kinds).
    """
    if kind not in KINDS:
        raise ValueError(f"build_tiny: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    unknown = set(sizes) - set(PRESET_SIZES[kind]) - {"tie"}
    if unknown:
        raise ValueError(f"build_tiny({kind!r}): unknown sizes {sorted(unknown)}; "
                         f"expected {sorted(PRESET_SIZES[kind])}")
    s = {**PRESET_SIZES[kind], **sizes}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind.startswith("clip-"):
        from mmkd.models.clip import CLIPModel

        cfg_path = out / "_tiny_config.json"
        cfg_path.write_text(json.dumps(tiny_clip_config(**s)))
        model = CLIPModel(str(cfg_path))
        cfg_path.unlink()
        model.save_pretrained(out)
        return out
    if kind == "onevision-teacher":
        _write_onevision(out, tokenizer, s)
        return out
    if kind.startswith("qwen-vl-"):
        _write_qwen_vl(out, tokenizer, s)
        return out
    from mmkd.models.student import MLLMStudent

    with tempfile.TemporaryDirectory(prefix="mmkd-tiny-") as tmp:
        vision, lm = write_vision_and_lm(Path(tmp), tokenizer, s)
        student = MLLMStudent(vision, lm, tokenizer=tokenizer)
    if kind == "moe-student":
        student.upcycle_language_model(s["num_experts"], s["top_k"], s["every"])
        # A fresh router is zero-free random; scale it up so routing is not uniform in tests and demos.
        with torch.no_grad():
            for gate in student._routers.gates:
                gate.weight.normal_(0.0, 0.5)
    student.save_pretrained(out)
    return out


def _write_onevision(out: Path, tokenizer: str, s: dict[str, Any]) -> None:
    """A random LLaVA-OneVision model (SigLIP tower + Qwen2 LM) and its processor, written to ``out``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        SiglipVisionConfig,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer)
    edge = s["image_size"]
    grid = [[edge * a, edge * b] for a in (1, 2) for b in (1, 2)]
    vision = SiglipVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=4 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["heads"],
        image_size=edge,
        patch_size=s["patch_size"],
    )
    text = _qwen2_config(tok, s, 1024)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(out)
    size = {"height": edge, "width": edge}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, crop_size=size, image_grid_pinpoints=grid),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tok,
        num_image_tokens=(edge // s["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=tok.chat_template,
    )
    processor.save_pretrained(out)


def qwen_vl_tokenizer(tokenizer: str, out_dir: str | Path) -> Path:
    """``tokenizer`` with Qwen2-VL's vision tokens added (its image token ``<|image_pad|>``), written to ``out_dir``.

    A student that distils from a Qwen-VL preset shares this tokenizer (token-level distillation needs one
    vocabulary): pass the folder as its ``tokenizer``.
    """
    tok = AutoTokenizer.from_pretrained(tokenizer)
    missing = [t for t in QWEN_VL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
    out = Path(out_dir)
    tok.save_pretrained(out)
    return out


def _write_qwen_vl(out: Path, tokenizer: str, s: dict[str, Any]) -> None:
    """A random Qwen2.5-VL model (windowed ViT + merger + Qwen2 LM with 3-D rotary positions) and its processor."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

    tok = AutoTokenizer.from_pretrained(qwen_vl_tokenizer(tokenizer, out))
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
    head_dim = s["hidden"] // s["heads"]
    quarter = head_dim // 2 // 4  # the temporal, height and width sections of the rotary half, 1:1.5:1.5 as Qwen's
    sections = [head_dim // 2 - 2 * ((head_dim // 2 - quarter) // 2)] + [(head_dim // 2 - quarter) // 2] * 2
    vision = Qwen2_5_VLVisionConfig(
        depth=s["vision_layers"], hidden_size=s["vision_hidden"], num_heads=s["heads"],
        intermediate_size=4 * s["vision_hidden"], patch_size=s["patch_size"], spatial_merge_size=2,
        temporal_patch_size=2, window_size=4 * s["patch_size"] * 2, out_hidden_size=s["hidden"],
        fullatt_block_indexes=[s["vision_layers"] - 1],
    )
    text = Qwen2_5_VLTextConfig(
        vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=1024, tie_word_embeddings=s.get("tie", False),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    factor = s["patch_size"] * 2  # the merged patch: images are resized to multiples of it
    pixels = {"patch_size": s["patch_size"], "merge_size": 2, "temporal_patch_size": 2,
              "min_pixels": (2 * factor) ** 2, "max_pixels": (8 * factor) ** 2}
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok,
        chat_template=tok.chat_template,
    ).save_pretrained(out)
