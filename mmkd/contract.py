"""The bottom layer: what every model returns, what every model offers, and what every batch holds.

Everything above this module speaks these types. Losses read :class:`ModelOutput` and :class:`CLIPOutput` only;
tasks take the batch dataclasses from their collators and hand :class:`ModelInputs` to the models; the training
app moves batches between devices without knowing their fields (Lightning moves dataclasses field by field).
Nothing here imports anything of mmkd.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = [
    "AUX_LOSS",
    "HEAD_GRADIENT",
    "PART_NAMES",
    "VIEW_PARTS",
    "CLIPBatch",
    "CLIPOutput",
    "ContrastiveModel",
    "DistillBatch",
    "ModelInputs",
    "ModelOutput",
    "PreferenceBatch",
    "PromptBatch",
    "TeacherTopK",
    "VisionLanguageModel",
]

# The part names a recipe may train (``train: [...]``): every model's ``parts()`` uses these. Image-text models:
# the vision tower, the projector, the language model (everything of it but experts and router), ``ffn`` (a view
# overlapping ``language_model`` and ``experts``: every feed-forward projection of the LM, dense or expert), the
# experts and the router of an MoE LM. CLIP models: the two towers and the logit scale.
PART_NAMES = ("vision_tower", "projector", "language_model", "ffn", "experts", "router", "text_tower", "logit_scale")
# Parts that are views over others (their parameters also belong to another part); every other part is disjoint.
VIEW_PARTS = ("ffn",)

# The name of the term a model adds to the loss itself (MoE router losses, already weighted by their coefficients):
# a stage adds it to the weighted objectives as it is.
AUX_LOSS = "aux"
# A term whose value is 0 and whose gradient is that of several objectives' weighted sum, computed in one pass over
# the student's LM head (mmkd.objectives.head): a stage adds it to the loss as it is and does not log it.
HEAD_GRADIENT = "_head_gradient"


# ---- what a forward pass returns ---------------------------------------------------------------------------------
@dataclass
class ModelOutput:
    """What one forward pass of an image-text teacher or student gives the objectives.

    Logits are not stored: they are computed on demand from ``last_hidden`` and the head, whole or in
    chunks, so that a ``(tokens, V)`` tensor exists only when an objective asks for it.

    Attributes:
        last_hidden: Final (normed) hidden states ``(B, T, H)``.
        head_weight: LM head weight ``(V, H)``.
        head_bias: LM head bias ``(V,)`` or None.
        hidden_states: Per-layer hidden states, each ``(B, T, H)``, when asked for.
        vision_features: Visual tokens after the projector, ``(N_img, N, H)``, or None without images (or when
            the images of a batch have different token counts).
        visual_mask: ``(B, T)`` bool, True at visual-token positions of the sequence.
        aux_loss: Scalar MoE router loss (load balancing + z-loss, already weighted), or None.
        image_base_tokens: Visual tokens of each image's base grid, a square ``g x g`` grid in row-major order
            that comes first in the image's run of visual positions: every visual token of a fixed-resolution
            family; for any-resolution families (LLaVA-OneVision: base grid, then the high-resolution tiles) the
            base grid only. None when unknown.
    """

    last_hidden: Tensor
    head_weight: Tensor
    head_bias: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    vision_features: Tensor | None = None
    visual_mask: Tensor | None = None
    aux_loss: Tensor | None = None
    image_base_tokens: int | None = None

    def logits(self, hidden: Tensor | None = None) -> Tensor:
        """Logits for ``hidden`` (default: every position), ``(..., V)``."""
        h = self.last_hidden if hidden is None else hidden
        out = h @ self.head_weight.t()
        return out if self.head_bias is None else out + self.head_bias


@dataclass
class CLIPOutput:
    """What a CLIP teacher or student gives: embeddings (not normalised) and its logit scale.

    Attributes:
        image_embeds: ``(B, D)``.
        text_embeds: ``(B, D)``.
        logit_scale: Scalar, already exponentiated.
    """

    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor


# ---- what a model offers -----------------------------------------------------------------------------------------
@runtime_checkable
class VisionLanguageModel(Protocol):
    """Every image-text teacher and student (``mmkd.models.ImageTextModel`` and its families).

    Any model with this interface can be the teacher or the student of any stage: collators read its tokenizer and
    image processor, objectives read its :class:`ModelOutput`, the runner reloads it with ``from_pretrained``.

    Attributes:
        tokenizer: The transformers tokenizer (chat template, pad token, image token).
        image_token: The token repeated once per visual position of the sequence.
        image_prompt: The text that stands for one image in a prompt (``<image>``; Qwen2.5-VL:
            ``<|vision_start|><|image_pad|><|vision_end|>``); records' ``<image>`` placeholders become this.
        num_image_tokens: Visual tokens of an image at the processor's own size (nominal for families whose count
            depends on the image).
        hidden_size: Width of the final hidden states.
        vocab_size: Rows of the LM head the objectives see.
        end_token_ids: Token ids that end an answer (end of turn).
    """

    tokenizer: Any
    image_token: str
    image_prompt: str
    num_image_tokens: int

    @property
    def hidden_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def end_token_ids(self) -> list[int]: ...

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False,
                 **image_inputs: Tensor) -> ModelOutput: ...

    def image_inputs(self, images: list[Any]) -> dict[str, Tensor]:
        """The image processor's whole output for ``images`` (``pixel_values``, ``image_grid_thw``, ...)."""
        ...

    def image_token_count(self, image: Any) -> int:
        """Visual tokens this model's sequence holds for ``image``."""
        ...

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by the part names a recipe may train (``vision_tower``, ``projector``, ...)."""
        ...

    def freeze(self) -> VisionLanguageModel: ...

    def generate(self, inputs: ModelInputs, max_new_tokens: int = 32, **generation: Any) -> Tensor: ...

    def save_pretrained(self, out_dir: str | os.PathLike) -> None: ...

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **options: Any) -> VisionLanguageModel: ...

    @classmethod
    def check_source(cls, path: str, **options: Any) -> None:
        """A cheap check, loading nothing, that ``path`` can hold this model (one-line error otherwise)."""
        ...


@runtime_checkable
class ContrastiveModel(Protocol):
    """Every CLIP teacher and student (``mmkd.models.CLIPModel``)."""

    embed_dim: int

    def __call__(self, images: Tensor, text_tokens: Tensor) -> CLIPOutput: ...

    def tokenize(self, texts: list[str]) -> Tensor: ...

    def preprocess_images(self, images: list[Any]) -> Tensor: ...

    def parts(self) -> dict[str, list[nn.Parameter]]: ...

    def freeze(self) -> ContrastiveModel: ...

    def save_pretrained(self, out_dir: str | os.PathLike) -> None: ...

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **options: Any) -> ContrastiveModel: ...


# ---- what a batch holds -------------------------------------------------------------------------------------------
@dataclass
class ModelInputs:
    """One model's inputs for a batch of sequences.

    Attributes:
        input_ids: ``(B, T)`` with every image expanded to the model's visual-token count.
        attention_mask: ``(B, T)``, 1 on real tokens.
        images: The model's image processor output for the batch's images, whole (``pixel_values`` plus whatever
            the family needs: ``image_sizes``, ``image_grid_thw``, ...); empty without images.
    """

    input_ids: Tensor
    attention_mask: Tensor
    images: dict[str, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Sequences in the batch."""
        return int(self.input_ids.shape[0])

    def kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments of a model's forward (and ``generate``)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.images}

    def to(self, device: Any) -> ModelInputs:
        """A copy on ``device``."""
        return ModelInputs(self.input_ids.to(device), self.attention_mask.to(device),
                           {k: v.to(device) for k, v in self.images.items()})


@dataclass
class TeacherTopK:
    """The teacher's next-token distributions at a batch's answer positions, as a teacher cache stores them.

    Rows follow the batch's answer positions in row-major order (sample by sample, left to right), the same order as
    ``student.last_hidden[answer_positions(labels)]``.

    Attributes:
        ids: ``(N, K)`` long, the teacher's top-k token ids.
        logprobs: ``(N, K)`` float32, its log-probabilities at them (temperature 1).
        log_tail: ``(N,)`` float32, the log of its probability outside the top-k.
    """

    ids: Tensor
    logprobs: Tensor
    log_tail: Tensor

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])


@dataclass
class DistillBatch:
    """A training batch of labelled sequences for the student and, when its inputs differ, for the teacher.

    Labels follow Hugging Face: ``labels[t]`` is the token at position ``t`` on answer tokens and -100 elsewhere;
    the hidden state at ``t - 1`` predicts it. Both sides label the same answer tokens.

    Attributes:
        inputs: The student's inputs.
        labels: ``(B, T)``.
        teacher_inputs: The teacher's own inputs (another processor, visual-token count or template), or None when
            the teacher reads the student's.
        teacher_labels: ``(B, T')`` with ``teacher_inputs``.
        standin: The collator dropped every sample: this is one tiny stand-in that a training step weighs by 0.
        data_stats: What the collator counted for this batch (samples, truncated, skipped_overflow, bad).
        ids: Record ids, in batch order.
        prompt: The same samples' generation prompts (left padded), for tasks that generate answers; None unless
            the task's collator was asked for them.
        teacher_prompt: The teacher's own prompts, when its inputs differ.
        keys: Each sample's teacher-cache key (:func:`mmkd.cache.record_key` of what the teacher sees), when the
            collator was asked for them; empty otherwise.
        teacher_topk: The teacher's top-k at the answer positions, read from a teacher cache; None otherwise.
        teacher_logprobs: ``(B,)`` the teacher's summed answer log-probabilities, read from a teacher cache
            (preference batches); None otherwise.
    """

    inputs: ModelInputs
    labels: Tensor
    teacher_inputs: ModelInputs | None = None
    teacher_labels: Tensor | None = None
    standin: bool = False
    data_stats: dict[str, int] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    prompt: ModelInputs | None = None
    teacher_prompt: ModelInputs | None = None
    keys: list[str] = field(default_factory=list)
    teacher_topk: TeacherTopK | None = None
    teacher_logprobs: Tensor | None = None

    @property
    def size(self) -> int:
        return self.inputs.size

    def teacher_side(self) -> tuple[ModelInputs, Tensor]:
        """The teacher's inputs and labels: its own when the batch carries them, else the student's."""
        if self.teacher_inputs is None:
            return self.inputs, self.labels
        return self.teacher_inputs, self.teacher_labels


@dataclass
class PromptBatch:
    """Generation prompts (every turn but a final assistant one, plus the assistant header), left padded.

    Attributes:
        inputs: The model's inputs.
        ids: Record ids of the prompts kept, in batch order.
        data_stats: What the collator counted.
        teacher_inputs: The teacher's own prompts, when a teacher side was asked for and its inputs differ.
    """

    inputs: ModelInputs
    ids: list[str] = field(default_factory=list)
    data_stats: dict[str, int] = field(default_factory=dict)
    teacher_inputs: ModelInputs | None = None

    @property
    def size(self) -> int:
        return self.inputs.size


@dataclass
class PreferenceBatch:
    """Chosen and rejected answers to the same prompts, each side a labelled batch (teacher inputs included).

    Attributes:
        chosen: The chosen answers.
        rejected: The rejected answers, row by row the same prompts.
        standin: As in :class:`DistillBatch`.
        data_stats: What the collator counted (pairs).
        keys: Each pair's teacher-cache key (both of the teacher's sequences, chosen first), when asked for.
    """

    chosen: DistillBatch
    rejected: DistillBatch
    standin: bool = False
    data_stats: dict[str, int] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.chosen.size


@dataclass
class CLIPBatch:
    """Image-caption pairs for contrastive models, each side preprocessed and tokenised by its own model.

    Attributes:
        images: ``(B, 3, H, W)`` for the student.
        text: ``(B, L)`` student token ids.
        teacher_images: The teacher's, or None without a teacher.
        teacher_text: The teacher's, or None.
        standin: As in :class:`DistillBatch`.
        data_stats: What the collator counted.
    """

    images: Tensor
    text: Tensor
    teacher_images: Tensor | None = None
    teacher_text: Tensor | None = None
    standin: bool = False
    data_stats: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


def batch_stats(batch: Any) -> Mapping[str, int]:
    """The collator's counts of any batch type (empty for a batch without them)."""
    return getattr(batch, "data_stats", None) or {}
