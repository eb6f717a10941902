"""The input side of an image-text model: its processor and the few config facts its inputs depend on.

Collators need a model's tokenizer, image token, image prompt, visual-token counts and image processor, never its
weights. :class:`ImageTextInputs` holds exactly that, so a stage can build a teacher's inputs without loading the
teacher (a stage that reads the teacher from a cache: the cache is keyed by what the teacher saw).
:class:`mmkd.models.ImageTextModel` keeps one of these and answers the same questions through it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torch import Tensor

__all__ = ["ImageTextInputs"]


class ImageTextInputs:
    """A transformers image-text processor and its model config, as the collators and the cache see a model.

    Args:
        processor: The model's processor (tokenizer with chat template and image token, image processor).
        config: The model's config (image token id, vision start/end tokens, vision config, tiling grid).
    """

    def __init__(self, processor: Any, config: Any, identity: dict[str, Any] | None = None) -> None:
        self.processor = processor
        self.config = config
        # Where the model comes from (path or hub id, revision, dtype, weights fingerprint), when it was loaded from
        # a folder or hub id: what a teacher cache records and checks (mmkd.models.identity.source_identity).
        self.identity = identity
        tok = processor.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.image_token: str = getattr(processor, "image_token", None) or "<image>"
        cfg_id = getattr(config, "image_token_id", None)
        if cfg_id is None:
            cfg_id = getattr(config, "image_token_index", None)
        self.image_token_id: int = int(cfg_id if cfg_id is not None else tok.convert_tokens_to_ids(self.image_token))
        # The text that stands for one image in a prompt: the image token itself for LLaVA-class processors; the
        # token between the vision start and end tokens for families that declare them (Qwen2-VL, Qwen2.5-VL, ...).
        self.image_prompt: str = self.image_token
        start, end = (getattr(config, f"vision_{k}_token_id", None) for k in ("start", "end"))
        if start is not None and end is not None:
            self.image_prompt = tok.convert_ids_to_tokens(start) + self.image_token + tok.convert_ids_to_tokens(end)
        self.num_image_tokens, self.fixed_image_tokens = self._probe_image_tokens()
        self.image_base_tokens = self._base_grid_tokens()

    @classmethod
    def from_pretrained(cls, path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                        dtype: str = "float32", quantize: str | None = None, **ignored: Any) -> ImageTextInputs:
        """The input side of a model folder or hub id: its processor and config, no weights.

        Args:
            path: Hub id or local folder.
            revision: Hub revision.
            trust_remote_code: As for the model.
            dtype: The dtype the model runs in (recorded in :attr:`identity`, nothing is loaded in it).
            quantize: The model's quantization (recorded likewise).
            ignored: The model's other loading options (attention implementation, ...): they do not change its inputs.
        """
        from transformers import AutoConfig, AutoProcessor

        from mmkd.models.errors import load_or_explain
        from mmkd.models.identity import source_identity

        processor = load_or_explain(
            lambda: AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision),
            path, key="path", what="processor", needs=("tokenizer_config.json",), weights=False,
        )
        config = load_or_explain(
            lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision),
            path, key="path", what="model config", weights=False,
        )
        return cls(processor, config, source_identity(path, revision=revision, dtype=dtype, quantize=quantize))

    def fingerprints(self) -> dict[str, str | None]:
        """sha256 fingerprints of the tokenizer and the processor (:mod:`mmkd.models.identity`)."""
        from mmkd.models.identity import processor_fingerprint, tokenizer_fingerprint

        return {"tokenizer": tokenizer_fingerprint(self.tokenizer), "processor": processor_fingerprint(self.processor)}

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (chat template, pad token, image token)."""
        return self.processor.tokenizer

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the pixel values the image processor produces."""
        ip = self.processor.image_processor
        size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
        size = size if isinstance(size, dict) else dict(size)
        if "height" in size:
            return int(size["height"]), int(size["width"])
        edge = int(size.get("shortest_edge", 224))
        return edge, edge

    def _count_by_processor(self, image: Image.Image) -> int:
        enc = self.processor(text=self.image_token, images=[image.convert("RGB")], return_tensors="pt")
        return int((enc["input_ids"] == self.image_token_id).sum())

    def _probe_image_tokens(self) -> tuple[int, bool]:
        """Visual tokens of an image of the processor's size, and whether every image gets that many.

        Asks the processor itself, so models whose count differs from (size/patch)^2 are right too. A family whose
        count depends on the image (any-resolution tiling, dynamic resolution) gives another count for an image
        twice as wide.
        """
        h, w = self.image_size
        nominal = self._count_by_processor(Image.new("RGB", (w, h)))
        return nominal, self._count_by_processor(Image.new("RGB", (2 * w, h))) == nominal

    def _base_grid_tokens(self) -> int | None:
        """Visual tokens of each image's base grid (``ModelOutput.image_base_tokens``), or None.

        A fixed-resolution family's image is one square grid; an any-resolution LLaVA (NeXT, OneVision) puts the
        base image's ``(size / patch)²`` grid first, then the tiles; a dynamic-resolution family (Qwen-VL) has no
        grid common to its images.
        """
        if self.fixed_image_tokens:
            side = math.isqrt(self.num_image_tokens)
            return self.num_image_tokens if side * side == self.num_image_tokens else None
        vision = getattr(self.config, "vision_config", None)
        if getattr(self.config, "image_grid_pinpoints", None) and vision is not None:
            return (int(vision.image_size) // int(vision.patch_size)) ** 2
        return None

    def image_inputs(self, images: list[Image.Image]) -> dict[str, Tensor]:
        """The model's image inputs for ``images`` (in batch order), from its own image processor.

        ``{"pixel_values": (N, 3, H, W)}`` for fixed-resolution families; other families add what their forward
        needs (``image_sizes``, ``image_grid_thw``, ...) and lay ``pixel_values`` out their way.
        """
        if not images:
            return {}
        enc = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return {k: v for k, v in enc.items() if isinstance(v, Tensor)}

    def image_token_count(self, image: Image.Image) -> int:
        """Visual tokens this model's sequence holds for ``image``: its processor's own count."""
        if self.fixed_image_tokens:
            return self.num_image_tokens
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is not None:
            return int(count(image_sizes=[(image.height, image.width)])["num_image_tokens"][0])
        return self._count_by_processor(image)

    def preprocess_images(self, images: list[Image.Image]) -> Tensor:
        """PIL images to ``(N, 3, H, W)`` pixel values with this model's own image processor."""
        if not images:
            h, w = self.image_size
            return torch.empty(0, 3, h, w)
        return self.image_inputs(images)["pixel_values"]

    def token_types(self, input_ids: Tensor) -> Tensor:
        """``(B, T)`` modality of each token as the family's processor marks it: 1 on image tokens, 0 on text."""
        return (input_ids == self.image_token_id).to(torch.int32)
