"""Vision towers for MLLM students, all ending up as transformers CLIP/SigLIP vision models.

``vision`` strings:

* a hub id or folder of an HF CLIP or SigLIP model (full or vision-only) -- loaded as is;
* ``open_clip:ARCH[:PRETRAINED]`` (tag or checkpoint file), ``open_clip:local-dir:DIR``, ``open_clip:DIR``;
* ``timm:NAME[:CHECKPOINT]``.

open_clip and timm ViTs whose blocks map one to one onto HF CLIP (class token, pre-norm, plain pre-LN
blocks, no layer scale, GELU or QuickGELU) are converted to HF CLIP vision weights, so the student is still a
plain transformers Llava. Other towers are refused with a one-line error (see docs/models.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionModel,
)

from mmkd.models.errors import ModelNotFoundError, load_or_explain

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionTower:
    """A loaded vision tower in transformers form.

    Attributes:
        model: ``CLIPVisionModel`` or ``SiglipVisionModel`` with its weights.
        image_processor: Matching transformers image processor.
        select_strategy: ``"default"`` (drop the class token) or ``"full"`` (SigLIP has none).
        num_extra_tokens: Tokens before the patches in the tower's output (1 for a class token).
    """

    model: nn.Module
    image_processor: Any
    select_strategy: str
    num_extra_tokens: int


def _clip_processor(size: int, mean: tuple[float, ...] = OPENAI_MEAN, std: tuple[float, ...] = OPENAI_STD) -> Any:
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def load_vision_tower(vision: str, *, image_size: int | None = None, dtype: torch.dtype = torch.float32) -> VisionTower:
    """Load ``vision`` (see module docstring) as a transformers CLIP/SigLIP vision model with its processor."""
    if vision.startswith("open_clip:"):
        tower = _from_open_clip(vision[len("open_clip:") :], image_size)
    elif vision.startswith("timm:"):
        tower = _from_timm(vision[len("timm:") :], image_size)
    else:
        tower = _from_hf(vision, image_size)
    tower.model.to(dtype)
    return tower


def _from_hf(vision: str, image_size: int | None) -> VisionTower:
    what = "CLIP/SigLIP vision model"
    cfg = load_or_explain(lambda: AutoConfig.from_pretrained(vision), vision, key="vision", what=what)
    vcfg = getattr(cfg, "vision_config", cfg)
    kind = vcfg.model_type
    if kind not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"vision={vision!r}: a {cfg.model_type!r} model is not an HF CLIP or SigLIP vision tower")
    if image_size is not None and image_size != vcfg.image_size:
        raise ValueError(f"vision={vision!r}: image_size={image_size} differs from the tower's {vcfg.image_size}")
    cls = CLIPVisionModel if kind == "clip_vision_model" else SiglipVisionModel
    model = load_or_explain(lambda: cls.from_pretrained(vision, config=vcfg), vision, key="vision", what=what)
    try:
        processor = AutoImageProcessor.from_pretrained(vision)
    except (OSError, ValueError):
        size = vcfg.image_size
        processor = (
            _clip_processor(size)
            if kind == "clip_vision_model"
            else SiglipImageProcessor(size={"height": size, "width": size})
        )
    siglip = kind == "siglip_vision_model"
    return VisionTower(model, processor, "full" if siglip else "default", 0 if siglip else 1)


def _split_open_clip(spec: str) -> tuple[str, str | None]:
    if spec.startswith(("local-dir:", "hf-hub:")):
        return spec, None
    if os.path.isdir(os.path.expanduser(spec)):
        return f"local-dir:{os.path.expanduser(spec)}", None
    arch, _, pretrained = spec.partition(":")
    return arch, pretrained or None


def _from_open_clip(spec: str, image_size: int | None) -> VisionTower:
    import open_clip

    name, pretrained = _split_open_clip(spec)
    key = "vision"
    if name.startswith("local-dir:") and not os.path.isfile(
        os.path.join(name[len("local-dir:") :], "open_clip_config.json")
    ):
        raise ModelNotFoundError(
            f"vision='open_clip:{spec}': folder lacks open_clip_config.json (expected a folder written by "
            "CLIPModel.save_pretrained or open_clip's save_for_hf)",
            path=spec,
            key=key,
        )
    kwargs = {"force_image_size": image_size} if image_size else {}
    model = load_or_explain(
        lambda: open_clip.create_model(name, pretrained=pretrained, **kwargs),
        spec,
        key=key,
        what="open_clip model",
        check=False,  # the open_clip folder layout was checked above
    )
    visual = model.visual
    hf = open_clip_visual_to_hf(visual, where=f"open_clip:{spec}")
    size = hf.config.image_size
    mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)
    return VisionTower(hf, _clip_processor(size, mean, std), "default", 1)


def _act_name(act: nn.Module, where: str) -> str:
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "none":
        return "gelu"
    if name == "QuickGELU":
        return "quick_gelu"
    raise ValueError(f"vision={where!r}: activation {name} has no HF CLIP equivalent")


@torch.no_grad()
def open_clip_visual_to_hf(visual: nn.Module, *, where: str) -> CLIPVisionModel:
    """Convert an open_clip ``VisionTransformer`` into an HF ``CLIPVisionModel`` with the same outputs.

    The hidden states of every block match one to one; only the pooled-output projection (``proj``) is
    dropped, since an MLLM reads the patch tokens.
    """
    if type(visual).__name__ != "VisionTransformer":
        raise ValueError(f"vision={where!r}: only open_clip ViTs convert to HF CLIP, got {type(visual).__name__}")
    blocks = list(visual.transformer.resblocks)
    block = blocks[0]
    ok = (
        isinstance(visual.ln_pre, nn.LayerNorm)
        and getattr(visual, "attn_pool", None) is None
        and isinstance(block.ls_1, nn.Identity)
        and isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity)
        and getattr(visual.conv1, "bias", None) is None
        and type(block.attn).__name__ == "MultiheadAttention"
    )
    if not ok:
        raise ValueError(
            f"vision={where!r}: this open_clip ViT (no pre-norm, attention pooling or layer scale) does not map "
            "one to one onto HF CLIP; use an HF CLIP/SigLIP tower"
        )
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0]
    grid = visual.grid_size[0]
    cfg = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=_act_name(block.mlp.gelu, where),
        layer_norm_eps=visual.ln_pre.eps,
        projection_dim=width,
    )
    hf = CLIPVisionModel(cfg)
    sd: dict[str, Tensor] = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
    }
    for i, b in enumerate(blocks):
        sd.update(_hf_clip_layer(i, b.attn.in_proj_weight, b.attn.in_proj_bias, b.attn.out_proj, b.ln_1, b.ln_2,
                                 b.mlp.c_fc, b.mlp.c_proj))
    return _load_clip_vision(hf, sd)


def _hf_clip_layer(
    i: int, qkv_weight: Tensor, qkv_bias: Tensor, out: nn.Module, ln1: nn.Module, ln2: nn.Module, fc1: nn.Module,
    fc2: nn.Module,
) -> dict[str, Tensor]:
    """HF CLIP vision weights of encoder layer ``i`` from a fused-QKV ViT block (open_clip and timm alike)."""
    p = f"vision_model.encoder.layers.{i}."
    q, k, v = qkv_weight.chunk(3, 0)
    qb, kb, vb = qkv_bias.chunk(3, 0)
    sd = {p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
          p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
          p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb}
    for name, module in (("self_attn.out_proj", out), ("layer_norm1", ln1), ("layer_norm2", ln2),
                         ("mlp.fc1", fc1), ("mlp.fc2", fc2)):
        sd[p + name + ".weight"] = module.weight
        sd[p + name + ".bias"] = module.bias
    return sd


def _load_clip_vision(hf: CLIPVisionModel, sd: dict[str, Tensor]) -> CLIPVisionModel:
    # transformers 5 may or may not nest the weights under `vision_model.`; follow whatever this version uses.
    nested = any(k.startswith("vision_model.") for k in hf.state_dict())
    prefix = len("vision_model.")
    hf.load_state_dict({(k if nested else k[prefix:]): v.detach().clone() for k, v in sd.items()}, strict=True)
    return hf.eval()


def _from_timm(spec: str, image_size: int | None) -> VisionTower:
    import timm

    name, _, checkpoint = spec.partition(":")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    if checkpoint:
        if not os.path.isfile(os.path.expanduser(checkpoint)):
            raise ModelNotFoundError(f"vision='timm:{spec}': checkpoint file {checkpoint!r} not found", path=spec)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.expanduser(checkpoint)})
    else:
        kwargs["pretrained"] = True
    model = load_or_explain(
        lambda: timm.create_model(name, **kwargs), spec, key="vision", what="timm model", check=False
    )
    hf = timm_vit_to_hf(model, where=f"timm:{spec}")
    cfg = model.pretrained_cfg or {}
    mean, std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))
    return VisionTower(hf, _clip_processor(hf.config.image_size, mean, std), "default", 1)


@torch.no_grad()
def timm_vit_to_hf(vit: nn.Module, *, where: str) -> CLIPVisionModel:
    """Convert a timm ``VisionTransformer`` with CLIP layout (class token, ``norm_pre``, no layer scale, no
    register tokens, bias-free patch embedding) into an HF ``CLIPVisionModel`` with the same hidden states."""
    blocks = list(getattr(vit, "blocks", []))
    ok = (
        type(vit).__name__ == "VisionTransformer"
        and isinstance(vit.norm_pre, nn.LayerNorm)
        and vit.cls_token is not None
        and getattr(vit, "num_reg_tokens", 0) == 0
        and vit.patch_embed.proj.bias is None
        and blocks
        and isinstance(blocks[0].ls1, nn.Identity)
        and isinstance(blocks[0].attn.q_norm, nn.Identity)
        and not getattr(vit, "no_embed_class", False)
    )
    if not ok:
        raise ValueError(
            f"vision={where!r}: only CLIP-layout timm ViTs (class token, pre-norm, no layer scale, e.g. "
            "vit_base_patch16_clip_224) convert to HF CLIP; use an HF CLIP/SigLIP tower"
        )
    width = vit.embed_dim
    patch = vit.patch_embed.patch_size[0]
    cfg = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.fc1.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=vit.patch_embed.img_size[0],
        patch_size=patch,
        hidden_act=_act_name(blocks[0].mlp.act, where),
        layer_norm_eps=vit.norm_pre.eps,
        projection_dim=width,
    )
    hf = CLIPVisionModel(cfg)
    sd: dict[str, Tensor] = {
        "vision_model.embeddings.class_embedding": vit.cls_token.reshape(-1),
        "vision_model.embeddings.patch_embedding.weight": vit.patch_embed.proj.weight,
        "vision_model.embeddings.position_embedding.weight": vit.pos_embed.reshape(-1, width),
        "vision_model.pre_layrnorm.weight": vit.norm_pre.weight,
        "vision_model.pre_layrnorm.bias": vit.norm_pre.bias,
        "vision_model.post_layernorm.weight": vit.norm.weight,
        "vision_model.post_layernorm.bias": vit.norm.bias,
    }
    for i, b in enumerate(blocks):
        bias = b.attn.qkv.bias if b.attn.qkv.bias is not None else torch.zeros(3 * width)
        sd.update(_hf_clip_layer(i, b.attn.qkv.weight, bias, b.attn.proj, b.norm1, b.norm2, b.mlp.fc1, b.mlp.fc2))
    return _load_clip_vision(hf, sd)
