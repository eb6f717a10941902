"""Loading transformers image-text-to-text models and their processors (hub id or folder, dtype, bitsandbytes)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from mmkd.models.errors import load_or_explain
from mmkd.models.moe import quiet_empty_init

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or bf16/fp16/fp32) to a torch dtype."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


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
