"""LLaVA-class models (Llava and its kin) loaded through transformers' Auto classes, as teachers or students."""

from __future__ import annotations

from mmkd.models.mllm import ImageTextModel


class LlavaModel(ImageTextModel):
    """A LLaVA-class model from the hub or a local folder, behind the output contract.

    Any transformers image-text-to-text model whose processor expands an image token (LLaVA-1.5, LLaVA-NeXT,
    LLaVA-OneVision, ...) works, as a teacher or as a student.

    Args:
        path: Hub id or local folder (``save_pretrained`` layout with processor files).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        quantize: ``"8bit"`` or ``"4bit"`` to load the weights through bitsandbytes, or None.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``... (None: transformers' default).
        gradient_checkpointing: Recompute activations in backward (a student).
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
        self._load_into(path, dtype=dtype, quantize=quantize, attn_implementation=attn_implementation,
                        gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
                        revision=revision)
