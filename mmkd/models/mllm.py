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

from mmkd.contract import ModelInputs, ModelOutput
from mmkd.models.inputs import ImageTextInputs
from mmkd.models.loading import load_image_text
from mmkd.models.moe import RouterLossCollector

__all__ = ["ImageTextModel"]

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
        self.path: str | None = getattr(hf, "name_or_path", None) or None
        self.quantize: str | None = None
        self._frozen = False
        self._anchor_inputs: dict[str, Tensor] | None = None
        # Rows of the LM head exposed in ModelOutput; set by align_vocab so teacher and student logits line up.
        self.vocab_limit: int | None = None
        self._routers = RouterLossCollector.attach(hf, _text_config(hf))
        # The input side (tokenizer, image token and prompt, visual-token counts, image processor): what the
        # collators read, shared with a weight-free view of the same model (ImageTextInputs.from_pretrained).
        self.inputs_view = ImageTextInputs(processor, hf.config)
        view = self.inputs_view
        self.image_token, self.image_token_id, self.image_prompt = view.image_token, view.image_token_id, \
            view.image_prompt
        self.num_image_tokens, self._fixed_image_tokens = view.num_image_tokens, view.fixed_image_tokens
        self.image_base_tokens = view.image_base_tokens
        # Families whose forward takes the text's modality types (Qwen2.5-VL's 3-D rotary positions) get them from
        # the image token positions, as their processor would give them.
        self._takes_token_types = "mm_token_type_ids" in inspect.signature(
            getattr(hf, hf.base_model_prefix).forward).parameters
        if gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (chat template, pad token, ``<image>`` token)."""
        return self.processor.tokenizer

    @property
    def hidden_size(self) -> int:
        """Width of the final hidden states (the language model's ``hidden_size``)."""
        return int(_text_config(self.hf).hidden_size)

    @property
    def end_token_ids(self) -> list[int]:
        """Token ids that end an answer: the generation config's end tokens and the tokenizer's end-of-turn."""
        ids = self.hf.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None and eos not in ids else [])

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head the output contract exposes (the tokenizer's length once vocabularies are aligned)."""
        return int(self.vocab_limit or self.hf.get_output_embeddings().weight.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the pixel values the image processor produces."""
        return self.inputs_view.image_size

    # -- contract -------------------------------------------------------------------------------------------
    def token_types(self, input_ids: Tensor) -> Tensor:
        """``(B, T)`` modality of each token as the family's processor marks it: 1 on image tokens, 0 on text."""
        return self.inputs_view.token_types(input_ids)

    def _cast_images(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        """Floating image inputs in the compute dtype (integer ones, such as ``image_grid_thw``, unchanged)."""
        return {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in images.items()}

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
            input_ids: ``(B, T)`` with each image's token already expanded to its visual-token count.
            attention_mask: ``(B, T)``.
            pixel_values: ``(N_img, 3, H, W)`` (or the family's layout) or None.
            output_hidden_states: Also return per-layer hidden states of the language model.
            **kwargs: The other image inputs of the family (``image_sizes``, ``image_grid_thw``, ...), as the image
                processor gave them (``ModelInputs.images``).

        Returns:
            The output contract: ``last_hidden (B, T, H)``, LM head, ``vision_features (N_img, N, H)``,
            ``visual_mask (B, T)``, ``aux_loss`` for MoE language models.
        """
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.compute_dtype)
        kwargs = self._cast_images(kwargs)
        if self._takes_token_types:
            kwargs.setdefault("mm_token_type_ids", self.token_types(input_ids))
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
        if self.vocab_limit is not None and self.vocab_limit < weight.shape[0]:  # a slice's backward costs a copy
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
            image_base_tokens=self.image_base_tokens,
        )

    def _anchor_hook(self, base: nn.Module) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        """A forward hook for the token embeddings that adds :meth:`_vision_anchor` to their output, once."""
        fired = False

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            nonlocal fired
            if fired:
                return output
            fired = True
            anchor = self._vision_anchor(base, output.device)
            return output if anchor is None else output + anchor.to(output.dtype)

        return hook

    def _vision_anchor(self, base: nn.Module, device: torch.device) -> Tensor | None:
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
    def generate(self, inputs: ModelInputs, max_new_tokens: int = 32, **generation: Any) -> Tensor:
        """Greedy generation (unless sampling arguments say otherwise) through transformers' ``generate``.

        Args:
            inputs: Left-padded prompts (``PromptBatch.inputs``) with their image inputs.
            max_new_tokens: Tokens to generate at most.
            **generation: Arguments of transformers' ``generate`` (``do_sample``, ``temperature``, ``top_p``,
                ``synced_gpus``, a ``generation_config``...).

        Returns:
            ``(B, T_new)`` new token ids only (prompt removed), padded with the pad token.
        """
        kwargs = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask,
                  **self._cast_images(inputs.images), **generation}
        if self._takes_token_types:
            kwargs.setdefault("mm_token_type_ids", self.token_types(inputs.input_ids))
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if self.end_token_ids:
            kwargs.setdefault("eos_token_id", self.end_token_ids)
        prompt_len = kwargs["input_ids"].shape[1]
        handle = None
        if _partitioned(self.hf):
            # ZeRO-3: every rank must run every forward with the same modules. Ranks keep stepping until all have
            # finished (transformers does this only when it knows of DeepSpeed itself), and a text-only prompt runs
            # the vision path on a blank image where an image prompt runs its images: before the prefill where
            # transformers encodes images up front (models whose forward takes mm_encoder_outputs), else in it.
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                kwargs.setdefault("synced_gpus", True)
            if kwargs.get("pixel_values") is None or kwargs["pixel_values"].shape[0] == 0:
                kwargs.pop("pixel_values", None)
                base = getattr(self.hf, self.hf.base_model_prefix)
                if "mm_encoder_outputs" in inspect.signature(self.hf.forward).parameters:
                    # transformers encodes a prompt's images before the prefill, outside the model's forward
                    self._vision_anchor(base, inputs.input_ids.device)
                else:
                    handle = base.get_input_embeddings().register_forward_hook(self._anchor_hook(base))
        try:
            out = self.hf.generate(max_new_tokens=max_new_tokens, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        return out[:, prompt_len:]

    def image_inputs(self, images: list[Image.Image]) -> dict[str, Tensor]:
        """The model's image inputs for ``images`` (the image processor's whole output; see ImageTextInputs)."""
        return self.inputs_view.image_inputs(images)

    def image_token_count(self, image: Image.Image) -> int:
        """Visual tokens this model's sequence holds for ``image``: its processor's own count."""
        return self.inputs_view.image_token_count(image)

    def preprocess_images(self, images: list[Image.Image]) -> Tensor:
        """PIL images to ``(N, 3, H, W)`` pixel values with this model's own image processor."""
        return self.inputs_view.preprocess_images(images)

    # -- loading ----------------------------------------------------------------------------------------------
    def _load_into(self, path: str, *, quantize: str | None = None, gradient_checkpointing: bool = False,
                   **options: Any) -> None:
        from mmkd.models.identity import source_identity

        hf, processor, torch_dtype = load_image_text(str(path), key="path", quantize=quantize, **options)
        ImageTextModel.__init__(self, hf, processor, dtype=torch_dtype, gradient_checkpointing=gradient_checkpointing)
        self.path, self.quantize = str(path), quantize
        self.inputs_view.identity = source_identity(str(path), revision=options.get("revision"),
                                                    dtype=options.get("dtype", "float32"), quantize=quantize)

    @classmethod
    def input_view(cls, path: str | None = None, **options: Any) -> ImageTextInputs:
        """The input side of the model these arguments load (processor, config, identity), without its weights:
        what a stage that reads the model from a teacher cache builds its batches with.

        Args:
            path: Hub id or local folder (the ``path`` of the model's ``init_args``).
            options: The model's other ``init_args`` (revision, dtype, quantize, ...).
        """
        from mmkd.models.errors import ModelNotFoundError

        if path is None:
            raise ModelNotFoundError(f"{cls.__name__}: a cached teacher is read by its path or hub id (init_args.path);"
                                     " save this model with save_pretrained and name the folder", key="path")
        return ImageTextInputs.from_pretrained(str(path), **options)

    @classmethod
    def check_source(cls, path: str, **options: Any) -> None:
        """Raise a one-line :class:`~mmkd.models.errors.ModelNotFoundError` when ``path`` is a local folder that
        cannot hold this model (missing config or weights), without loading anything (a hub id passes)."""
        from mmkd.models.errors import check_folder, is_local

        if is_local(path):
            check_folder(path, key="path", what="image-text-to-text model")

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        dtype: str = "float32",
        quantize: str | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> ImageTextModel:
        """Load a model folder written by :meth:`save_pretrained` (or any image-text-to-text folder or hub id)
        through transformers' Auto classes, as this class (dense or MoE language model alike).

        Args: as :class:`mmkd.models.LlavaModel`.
        """
        self = cls.__new__(cls)
        self._load_into(str(folder), dtype=dtype, quantize=quantize, attn_implementation=attn_implementation,
                        gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
                        revision=revision)
        return self

    # -- parts, freezing, saving ----------------------------------------------------------------------------
    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part name: ``vision_tower``, ``projector``, ``language_model``, ``ffn``, ``experts``,
        ``router``.

        ``vision_tower``, ``projector``, ``language_model``, ``experts`` and ``router`` are disjoint: on an MoE student
        ``language_model`` holds everything of the LM except the expert and router weights (the LM head belongs to
        ``language_model``). ``ffn`` is a view across them: every feed-forward projection of the LM, the dense
        layers' MLPs and the experts (LLaVA-MoD trains these, the routers and the projector). Only non-empty parts
        appear.
        """
        out: dict[str, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for name, p in self.hf.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = _part_of(name)
            out.setdefault(part, []).append(p)
            if part in ("language_model", "experts") and ".mlp." in name and ".mlp.gate." not in name:
                out.setdefault("ffn", []).append(p)
        order = ("vision_tower", "projector", "language_model", "ffn", "experts", "router")
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
    # The projector first: Qwen2.5-VL's sits inside its vision module (``visual.merger``).
    if "multi_modal_projector" in name or "projector" in name or ".merger." in name:
        return "projector"
    if "vision_tower" in name or "vision_model" in name or ".visual." in name:
        return "vision_tower"
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
