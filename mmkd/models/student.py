"""Small MLLM students built from parts: a vision tower, an ``mlp2x_gelu`` projector and any HF causal LM.

The student *is* a transformers ``LlavaForConditionalGeneration`` (with a ``LlavaProcessor``), so its
``save_pretrained`` folder loads with transformers' Auto classes and ``pipeline("image-text-to-text")``
without mmkd. An upcycled MoE student is the same Llava with a Qwen2-MoE text model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmkd.models.errors import load_or_explain
from mmkd.models.loading import resolve_dtype
from mmkd.models.mllm import ImageTextModel
from mmkd.models.moe import quiet_empty_init, upcycle_causal_lm
from mmkd.models.towers import load_vision_tower

PROJECTORS = ("mlp2x_gelu",)
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _prepare_tokenizer(tok: Any, image_token: str = "<image>") -> Any:
    """Make sure the tokenizer has an ``<image>`` special token, a pad token and a chat template."""
    if image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
    if getattr(tok, "image_token", image_token) != image_token:
        # A tokenizer that names another image token (Qwen-VL's <|image_pad|>) keeps it in its vocabulary, but the
        # LLaVA processor built on it expands the one it names: this student's.
        tok.image_token = image_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


class MLLMStudent(ImageTextModel):
    """A small MLLM built from a vision tower, an ``mlp2x_gelu`` projector and a causal LM.

    Args:
        vision: HF CLIP/SigLIP hub id or folder, ``open_clip:ARCH[:PRETRAINED]`` or ``timm:NAME[:CKPT]``.
        language_model: Hub id or folder of any ``AutoModelForCausalLM`` (Qwen2, Llama, ...).
        projector: Connector type; ``mlp2x_gelu`` (Linear-GELU-Linear, what Llava's config expresses).
        tokenizer: Tokenizer id or folder (default: the language model's); ``<image>`` is added if missing.
        image_size: Input resolution for open_clip/timm towers (HF towers keep theirs).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        gradient_checkpointing: Recompute activations in backward.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``... (None: transformers' default).
    """

    def __init__(
        self,
        vision: str,
        language_model: str,
        *,
        projector: str = "mlp2x_gelu",
        tokenizer: str | None = None,
        image_size: int | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        if projector not in PROJECTORS:
            raise ValueError(f"projector={projector!r}: expected one of {', '.join(PROJECTORS)}")
        torch_dtype = resolve_dtype(dtype)
        tower = load_vision_tower(vision, image_size=image_size, dtype=torch_dtype)
        lm_kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation is not None:
            lm_kwargs["attn_implementation"] = attn_implementation
        lm = load_or_explain(
            lambda: AutoModelForCausalLM.from_pretrained(language_model, **lm_kwargs),
            language_model,
            key="language_model",
            what="causal LM",
        )
        tok_path = tokenizer or language_model
        tok = load_or_explain(
            lambda: AutoTokenizer.from_pretrained(tok_path),
            tok_path,
            key="tokenizer",
            what="tokenizer",
            needs=("tokenizer_config.json",),
            weights=False,
        )
        tok = _prepare_tokenizer(tok)
        image_token_id = tok.convert_tokens_to_ids("<image>")
        if len(tok) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tok))
        vcfg = tower.model.config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        config = LlavaConfig(
            vision_config=vcfg,
            text_config=lm.config,
            image_token_id=image_token_id,
            image_seq_length=patches,
            projector_hidden_act="gelu",
            vision_feature_select_strategy=tower.select_strategy,
            vision_feature_layer=-2,  # LLaVA-1.5 reads the penultimate layer
            multimodal_projector_bias=True,
            tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        )
        hf = LlavaForConditionalGeneration(config).to(torch_dtype)
        hf.model.vision_tower.load_state_dict(tower.model.state_dict())
        hf.model.language_model.load_state_dict(lm.get_decoder().state_dict())
        hf.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        hf.generation_config.pad_token_id = tok.pad_token_id
        hf.generation_config.eos_token_id = tok.eos_token_id
        if attn_implementation is not None:
            hf.set_attn_implementation(attn_implementation)
        processor = LlavaProcessor(
            image_processor=tower.image_processor,
            tokenizer=tok,
            patch_size=vcfg.patch_size,
            vision_feature_select_strategy=tower.select_strategy,
            num_additional_image_tokens=tower.num_extra_tokens,
            chat_template=tok.chat_template,
            image_token="<image>",
        )
        super().__init__(hf, processor, dtype=torch_dtype, gradient_checkpointing=gradient_checkpointing)
        del lm, tower

    @torch.no_grad()
    def upcycle_language_model(
        self,
        num_experts: int,
        top_k: int,
        every: int = 1,
        router_aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        *,
        first_moe_layer: int | None = None,
        router_layer_reduction: str = "mean",
    ) -> MLLMStudent:
        """Replace the dense LM by its sparse-upcycled Qwen2-MoE (see :func:`mmkd.models.upcycle_to_moe`)."""
        hf = self.hf
        # Rebuild a stand-alone causal LM view of the inner decoder + head so the LM upcycler can work on it.
        dense = AutoModelForCausalLM.from_config(hf.config.text_config).to(self.compute_dtype)
        dense.get_decoder().load_state_dict(hf.model.language_model.state_dict())
        dense.get_output_embeddings().load_state_dict(hf.lm_head.state_dict())
        dense.generation_config = hf.generation_config
        moe = upcycle_causal_lm(dense, num_experts, top_k, every, router_aux_loss_coef, z_loss_coef,
                                first_moe_layer=first_moe_layer, router_layer_reduction=router_layer_reduction)
        config = hf.config
        config.text_config = moe.config
        with quiet_empty_init():
            new = LlavaForConditionalGeneration(config).to(self.compute_dtype)
        new.model.vision_tower.load_state_dict(hf.model.vision_tower.state_dict())
        new.model.multi_modal_projector.load_state_dict(hf.model.multi_modal_projector.state_dict())
        new.model.language_model.load_state_dict(moe.get_decoder().state_dict())
        new.lm_head.load_state_dict(moe.lm_head.state_dict())
        new.generation_config = hf.generation_config
        new.set_attn_implementation(hf.config._attn_implementation)
        if self._routers is not None:
            self._routers.remove()
        checkpointing = getattr(hf, "is_activation_checkpointing", False)
        ImageTextModel.__init__(
            self, new, self.processor, dtype=self.compute_dtype, gradient_checkpointing=checkpointing
        )
        return self
