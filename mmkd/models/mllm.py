"""The shared body of LLaVA-class teachers and MLLM students: one transformers image-text-to-text model
plus its processor, behind the output contract."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import PreTrainedModel, ProcessorMixin

from mmkd.contract import ModelOutput
from mmkd.models.moe import RouterLossCollector

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Keys a collated batch carries that generation does not take.
_NOT_FOR_GENERATE = ("labels", "teacher_", "chosen_", "rejected_", "ids", "answer")


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or bf16/fp16/fp32) to a torch dtype."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _text_config(hf: PreTrainedModel) -> Any:
    return hf.config.get_text_config(decoder=True)


class ImageTextModel(nn.Module):
    """A transformers image-text-to-text model and its processor with the mmkd output contract.

    Args:
        hf: The transformers model (``LlavaForConditionalGeneration`` or kin).
        processor: Its processor (tokenizer with chat template and ``<image>`` token, image processor).
        dtype: Floating dtype that images are cast to.
        gradient_checkpointing: Recompute activations in backward.
    """

    def __init__(
        self,
        hf: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.processor = processor
        self.compute_dtype = dtype
        self._frozen = False
        self._anchor_inputs: dict[str, Tensor] | None = None
        # Rows of the LM head exposed in ModelOutput; set by align_vocab so teacher and student logits line up.
        self.vocab_limit: int | None = None
        self._routers = RouterLossCollector.attach(hf, _text_config(hf))
        tok = processor.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.image_token: str = getattr(processor, "image_token", None) or "<image>"
        cfg_id = getattr(hf.config, "image_token_id", None)
        if cfg_id is None:
            cfg_id = getattr(hf.config, "image_token_index", None)
        self.image_token_id: int = int(cfg_id if cfg_id is not None else tok.convert_tokens_to_ids(self.image_token))
        self.num_image_tokens, self._fixed_image_tokens = self._probe_image_tokens()
        if gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (chat template, pad token, ``<image>`` token)."""
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

    def _probe_image_tokens(self) -> tuple[int, bool]:
        """Visual tokens of an image of the processor's size, and whether every image gets that many.

        Asks the processor itself, so models whose count differs from (size/patch)^2 are right too; families
        whose processor reports image sizes tile images at any resolution, so their count is per image.
        """
        h, w = self.image_size
        enc = self.processor(text=self.image_token, images=[Image.new("RGB", (w, h))], return_tensors="pt")
        return int((enc["input_ids"] == self.image_token_id).sum()), "image_sizes" not in enc

    # -- contract -------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> ModelOutput:
        """One forward pass over a collated batch.

        Args:
            input_ids: ``(B, T)`` with each ``<image>`` already expanded to ``num_image_tokens`` tokens.
            attention_mask: ``(B, T)``.
            pixel_values: ``(N_img, 3, H, W)`` or None.
            output_hidden_states: Also return per-layer hidden states of the language model.
            **kwargs: Extra model inputs some families need (e.g. ``image_sizes``).

        Returns:
            The output contract: ``last_hidden (B, T, H)``, LM head, ``vision_features (N_img, N, H)``,
            ``visual_mask (B, T)``, ``aux_loss`` for MoE language models.
        """
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.compute_dtype)
        if self._routers is not None:
            self._routers.start()
        base = getattr(self.hf, self.hf.base_model_prefix)
        handle = None
        if pixel_values is not None and pixel_values.shape[0] == 0:
            pixel_values = None
        if pixel_values is None and (torch.is_grad_enabled() or _partitioned(self.hf)):
            # Keep the vision path in every rank's graph, at the point an image batch runs it: right after the
            # token embeddings, inside the model's own forward (see _vision_anchor).
            handle = base.get_input_embeddings().register_forward_hook(self._anchor_hook(base))
        try:
            out = base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                output_hidden_states=output_hidden_states,
                use_cache=False,
                return_dict=True,
                **kwargs,
            )
        finally:
            if handle is not None:
                handle.remove()
        aux = self._routers.finish(attention_mask) if self._routers is not None else None
        last_hidden = out.last_hidden_state
        head = self.hf.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if self.vocab_limit is not None:
            weight = weight[: self.vocab_limit]
            bias = None if bias is None else bias[: self.vocab_limit]
        return ModelOutput(
            last_hidden=last_hidden,
            head_weight=weight,
            head_bias=bias,
            hidden_states=tuple(out.hidden_states) if output_hidden_states and out.hidden_states else None,
            vision_features=_vision_features(out),
            visual_mask=input_ids == self.image_token_id,
            aux_loss=aux,
        )

    def _anchor_hook(self, base: nn.Module) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        """A forward hook for the token embeddings that adds :meth:`_vision_anchor` to their output, once."""
        fired = False

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            nonlocal fired
            if fired:
                return output
            fired = True
            anchor = self._vision_anchor(base)
            return output if anchor is None else output + anchor.to(output.dtype)

        return hook

    def _vision_anchor(self, base: nn.Module) -> Tensor | None:
        """``0 ×`` the vision path on a blank image, for micro-batches without any image.

        Under DDP/ZeRO every rank must run the same graph: a rank whose micro-batch is text-only would otherwise
        skip the vision tower and projector. ZeRO-2 then reduces gradient buckets of different sizes. ZeRO-3
        gathers each module's parameter partitions right before it runs and prefetches the next ones by the
        module order it traced on the first step, in coalesced all-gathers: the ranks must call the same
        modules, parents included, in the same order, or their collectives pair up wrongly and wait forever.
        So this runs from a hook on the token embeddings inside the model's own forward, exactly where an image
        batch runs the vision tower and projector, and its zero is added to the embeddings: no value changes,
        the vision parameters get zero gradients, on every world size alike.
        """
        get = getattr(base, "get_image_features", None)
        if get is None:
            return None
        if self._anchor_inputs is None:  # the model's own processor on a blank image: right keys for any family
            h, w = self.image_size
            self._anchor_inputs = self.image_inputs([Image.new("RGB", (w, h))])
        accepted = inspect.signature(get).parameters
        vision_param = next(iter(base.vision_tower.parameters()), None) if hasattr(base, "vision_tower") else None
        device = vision_param.device if vision_param is not None else None
        inputs = {k: v.to(device) for k, v in self._anchor_inputs.items() if k in accepted}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.compute_dtype)
        cfg = self.hf.config
        for key in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            if key in accepted and getattr(cfg, key, None) is not None:
                inputs[key] = getattr(cfg, key)
        out = get(**inputs)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            return sum(f.float().sum() for f in feats) * 0.0
        return feats.float().sum() * 0.0

    @torch.no_grad()
    def generate(self, max_new_tokens: int = 32, **batch: Any) -> Tensor:
        """Greedy generation (unless sampling arguments say otherwise) through transformers' ``generate``.

        Args:
            max_new_tokens: Tokens to generate at most.
            **batch: ``input_ids (B, T)`` (left-padded for batched prompts), ``attention_mask``, ``pixel_values``,
                plus generation arguments; training-only batch keys (labels, ``teacher_*``, ...) are ignored.

        Returns:
            ``(B, T_new)`` new token ids only (prompt removed), padded with the pad token.
        """
        kwargs = {k: v for k, v in batch.items() if not k.startswith(_NOT_FOR_GENERATE)}
        if kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.compute_dtype)
        elif "pixel_values" in kwargs:
            del kwargs["pixel_values"]
        kwargs.setdefault("do_sample", False)
        tok = self.tokenizer
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        if tok.eos_token_id is not None:
            kwargs.setdefault("eos_token_id", tok.eos_token_id)
        prompt_len = kwargs["input_ids"].shape[1]
        out = self.hf.generate(max_new_tokens=max_new_tokens, **kwargs)
        return out[:, prompt_len:]

    def image_inputs(self, images: list[Image.Image]) -> dict[str, Tensor]:
        """The model's image inputs for ``images`` (in batch order), from its own image processor.

        ``{"pixel_values": (N, 3, H, W)}`` for fixed-resolution families; any-resolution families (LLaVA-NeXT,
        LLaVA-OneVision) add what their forward needs, e.g. ``image_sizes (N, 2)``, and their ``pixel_values``
        hold the patches of each image.
        """
        if not images:
            return {}
        enc = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return {k: v for k, v in enc.items() if isinstance(v, Tensor)}

    def image_token_count(self, image: Image.Image) -> int:
        """Visual tokens this model's sequence holds for ``image``: its processor's own count.

        Fixed-resolution families always give :attr:`num_image_tokens`; any-resolution ones depend on the
        image's size (asked through the processor's token arithmetic, else by running it on the image).
        """
        if self._fixed_image_tokens:
            return self.num_image_tokens
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is not None:
            return int(count(image_sizes=[(image.height, image.width)])["num_image_tokens"][0])
        enc = self.processor(text=self.image_token, images=[image.convert("RGB")], return_tensors="pt")
        return int((enc["input_ids"] == self.image_token_id).sum())

    def preprocess_images(self, images: list[Image.Image]) -> Tensor:
        """PIL images to ``(N, 3, H, W)`` pixel values with this model's own image processor."""
        if not images:
            h, w = self.image_size
            return torch.empty(0, 3, h, w)
        return self.image_inputs(images)["pixel_values"]

    # -- parts, freezing, saving ----------------------------------------------------------------------------
    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part name: ``vision_tower``, ``projector``, ``language_model``, ``experts``, ``router``.

        The lists are disjoint: on an MoE student ``language_model`` holds everything of the LM except the
        expert and router weights (the LM head belongs to ``language_model``). Only non-empty parts appear.
        """
        out: dict[str, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for name, p in self.hf.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.setdefault(_part_of(name), []).append(p)
        order = ("vision_tower", "projector", "language_model", "experts", "router")
        return {k: out[k] for k in order if out.get(k)}

    def freeze(self) -> ImageTextModel:
        """Eval mode and no gradients, for good: a frozen model stays in eval even if ``train()`` is called."""
        self._frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> ImageTextModel:
        return super().train(mode and not self._frozen)

    def gradient_checkpointing_enable(self) -> None:
        # Non-reentrant checkpointing works with frozen inputs (frozen vision tower, trainable LM).
        kwargs = {"use_reentrant": False}
        if hasattr(self.hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write weights (safetensors), config, generation config, tokenizer and processor to ``out_dir``."""
        self.hf.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)


def _partitioned(model: nn.Module) -> bool:
    """Whether the model's parameters are ZeRO-3 partitions (every rank must then run every module)."""
    first = next(iter(model.parameters()), None)
    return first is not None and hasattr(first, "ds_id")


def _part_of(name: str) -> str:
    if ".experts." in name or name.endswith(".experts"):
        return "experts"
    if ".mlp.gate." in name or name.endswith(".mlp.gate.weight"):
        return "router"
    if "shared_expert" in name:
        return "experts"
    if "vision_tower" in name or "vision_model" in name or ".visual." in name:
        return "vision_tower"
    if "multi_modal_projector" in name or "projector" in name or "merger" in name:
        return "projector"
    return "language_model"


def _vision_features(out: Any) -> Tensor | None:
    img = getattr(out, "image_outputs", None)
    feats = getattr(img, "pooler_output", None) if img is not None else None
    if feats is None:
        return None
    if isinstance(feats, (list, tuple)):
        if len({f.shape for f in feats}) != 1:
            return None  # images with different token counts cannot stack; the contract then has no features
        return torch.stack(list(feats))
    return feats
