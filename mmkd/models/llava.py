"""LLaVA-class models (Llava and its kin) loaded through transformers' Auto classes, usually as teachers."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from mmkd.models.errors import load_or_explain
from mmkd.models.mllm import ImageTextModel, resolve_dtype
from mmkd.models.moe import quiet_empty_init


def quantization_config(quantize: str | None, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """A bitsandbytes config for ``"8bit"`` or ``"4bit"`` (NF4, double quantisation), or None."""
    if quantize is None:
        return None
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise ValueError(f"quantize={quantize!r}: expected '8bit', '4bit' or null")


def load_image_text(
    path: str,
    *,
    key: str,
    dtype: str = "float32",
    quantize: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[Any, Any, torch.dtype]:
    """Load a transformers image-text-to-text model and its processor from a hub id or folder.

    Returns:
        ``(model, processor, compute dtype)``; errors are one-line :class:`ModelNotFoundError`.
    """
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    qcfg = quantization_config(quantize, torch_dtype)
    if qcfg is not None:
        # bitsandbytes places weights itself; "auto" puts them on the GPU when there is one, else the CPU.
        kwargs.update(quantization_config=qcfg, device_map="auto" if torch.cuda.is_available() else "cpu")
    what = "image-text-to-text model"
    with quiet_empty_init():
        hf = load_or_explain(
            lambda: AutoModelForImageTextToText.from_pretrained(path, **kwargs), path, key=key, what=what
        )
    processor = load_or_explain(
        lambda: AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision),
        path,
        key=key,
        what="processor",
        needs=("tokenizer_config.json",),
        weights=False,
    )
    return hf, processor, torch_dtype


class LlavaModel(ImageTextModel):
    """A LLaVA-class model from the hub or a local folder, behind the output contract.

    Args:
        path: Hub id or local folder (``save_pretrained`` layout with processor files).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        quantize: ``"8bit"`` or ``"4bit"`` to load the weights through bitsandbytes (teachers), or None.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``... (None: transformers' default).
        gradient_checkpointing: Recompute activations in backward (students trained as LlavaModel).
        trust_remote_code: Allow model code from the hub; off unless the recipe sets it.
        revision: Hub revision (branch, tag or commit).
    """

    def __init__(
        self,
        path: str,
        *,
        dtype: str = "float32",
        quantize: str | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        hf, processor, torch_dtype = load_image_text(
            path,
            key="path",
            dtype=dtype,
            quantize=quantize,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
        super().__init__(hf, processor, dtype=torch_dtype, gradient_checkpointing=gradient_checkpointing)
        self.path = path
        self.quantize = quantize
