"""Objective adapters: a recipe's objective names mapped onto the loss library.

An adapter reads the output contract (:class:`mmkd.contract.ModelOutput`) of the student and the teacher
plus the batch masks, selects the tokens its loss is defined on, and calls a loss from :mod:`mmkd.losses`.
Losses never see model internals; adapters never compute a divergence themselves.

Answer tokens follow the Hugging Face shift: the hidden state at position ``t - 1`` predicts ``labels[t]``.
The teacher's answer tokens come from ``teacher_labels`` when the batch carries the teacher's own inputs
(different visual-token counts), otherwise from ``labels``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # importing mmkd.models loads transformers; the registry must stay cheap for recipe checks
    from mmkd.contract import ModelOutput

__all__ = ["OBJECTIVES", "Objective", "answer_positions", "build_objective"]


def answer_positions(labels: Tensor) -> Tensor:
    """``(B, T)`` bool: positions whose hidden state predicts an answer token (``labels[t+1] != -100``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def answer_targets(labels: Tensor) -> Tensor:
    """The answer token ids in the order of :func:`answer_positions`, ``(N,)``."""
    return labels[:, 1:][labels[:, 1:] != -100]


def teacher_key(batch: Mapping[str, Tensor], key: str) -> Tensor | None:
    """The teacher's own tensor for ``key`` when the batch carries one, else the shared one."""
    return batch.get(f"teacher_{key}", batch.get(key))


class Objective(nn.Module):
    """Base class: ``forward(student, teacher, batch) -> scalar``.

    Attributes:
        needs_teacher: Whether the objective reads a teacher output.
        needs_hidden_states: Whether it reads per-layer hidden states.
    """

    needs_teacher = True
    needs_hidden_states = False

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError


class LanguageModeling(Objective):
    """Cross-entropy of the student on answer tokens (``lm``), computed on answer positions only."""

    needs_teacher = False

    def forward(self, student, teacher, batch):
        labels = batch["labels"]
        hidden = student.last_hidden[answer_positions(labels)]
        logits = student.logits(hidden).float()
        return F.cross_entropy(logits, answer_targets(labels))


class TokenDivergence(Objective):
    """A token-level divergence over answer tokens, chunked over the vocabulary heads.

    Neither side's ``(tokens, V)`` logits exist whole: :func:`mmkd.losses.chunked_token_loss` recomputes them
    chunk by chunk from the final hidden states and LM heads.
    """

    def __init__(self, loss: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.loss = loss
        self.chunk_size = chunk_size

    def forward(self, student, teacher, batch):
        from mmkd.losses import chunked_token_loss

        s_mask = answer_positions(batch["labels"])
        t_mask = answer_positions(teacher_key(batch, "labels"))
        _check_counts(s_mask, t_mask)
        return chunked_token_loss(
            self.loss,
            student.last_hidden[s_mask],
            student.head_weight,
            teacher.last_hidden[t_mask].detach(),
            teacher.head_weight.detach(),
            chunk_size=self.chunk_size,
        )


def _check_counts(s_mask: Tensor, t_mask: Tensor) -> None:
    s_count, t_count = s_mask.sum(1), t_mask.sum(1)
    bad = (s_count != t_count).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"sample {i} of the batch has {int(s_count[i])} student answer tokens but {int(t_count[i])} teacher "
            "answer tokens: teacher and student must select the same answer tokens"
        )


class MDistObjective(Objective):
    """LLaVA-KD's MDist: divergence on response tokens plus on visual-token positions."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        from mmkd.losses import MDist

        self.loss = MDist(**kwargs)

    def forward(self, student, teacher, batch):
        return self.loss.from_outputs(
            student, teacher, answer_positions(batch["labels"]), answer_positions(teacher_key(batch, "labels"))
        )


class RDistObjective(Objective):
    """LLaVA-KD's RDist: relation (self-similarity) distillation between visual tokens.

    Args:
        on: ``logits`` (LLaVA-KD: relations of the visual tokens' output distributions, computed in hidden
            space) or ``hidden`` (relations of the final hidden states).
        **kwargs: Arguments of :class:`mmkd.losses.RDist`.
    """

    def __init__(self, on: str = "logits", **kwargs: Any):
        super().__init__()
        from mmkd.losses import RDist

        if on not in ("logits", "hidden"):
            raise ValueError(f"objective_args.rdist.on={on!r}: expected 'logits' or 'hidden'")
        self.on = on
        self.loss = RDist(**kwargs)

    def forward(self, student, teacher, batch):
        return self.loss.from_outputs(student, teacher, on=self.on)


class FeatureObjective(Objective):
    """Hidden-state distillation on answer tokens through a learned projector when widths differ."""

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, **kwargs: Any):
        super().__init__()
        from mmkd.losses import FeatureDistill

        self.kwargs = kwargs
        self.loss = FeatureDistill(student_dim, teacher_dim, **kwargs) if student_dim and teacher_dim else None

    def forward(self, student, teacher, batch):
        s_mask = answer_positions(batch["labels"])
        t_mask = answer_positions(teacher_key(batch, "labels"))
        _check_counts(s_mask, t_mask)
        if self.loss is None:  # widths are known only once both outputs exist
            from mmkd.losses import FeatureDistill

            self.loss = FeatureDistill(student.last_hidden.shape[-1], teacher.last_hidden.shape[-1], **self.kwargs)
            self.loss.to(student.last_hidden.device)
        return self.loss(student.last_hidden[s_mask], teacher.last_hidden[t_mask].detach())


def _token(name: str):
    def build(total_steps: int | None = None, **kwargs: Any) -> Objective:
        import inspect

        import mmkd.losses as losses

        cls = getattr(losses, name)
        chunk = kwargs.pop("chunk_size", 1024)
        if "total_steps" in inspect.signature(cls).parameters and total_steps is not None:
            kwargs.setdefault("total_steps", total_steps)  # TAID's linear floor spans the stage
        return TokenDivergence(cls(**kwargs), chunk_size=chunk)

    return build


# name -> builder(**objective_args). Preference and CLIP objectives live in their modules.
OBJECTIVES: dict[str, Any] = {
    "lm": LanguageModeling,
    "kl": _token("ForwardKL"),
    "fkl": _token("ForwardKL"),
    "rkl": _token("ReverseKL"),
    "jsd": _token("JSD"),
    "tvd": _token("TotalVariation"),
    "skl": _token("SkewKL"),
    "srkl": _token("SkewReverseKL"),
    "taid": _token("TAID"),
    "mdist": MDistObjective,
    "rdist": RDistObjective,
    "feature": FeatureObjective,
    "dpo": None,  # PreferenceDistillModule
    "clip_kd": None,  # CLIPDistillModule
}

TEACHER_FREE = {"lm"}


def build_objective(name: str, total_steps: int | None = None, **kwargs: Any) -> Objective:
    """The adapter for an objective name of a ``distill`` stage.

    Args:
        name: A key of :data:`OBJECTIVES`.
        total_steps: Optimizer steps of the stage, for objectives with a schedule (TAID).
        **kwargs: The objective's ``objective_args``.
    """
    builder = OBJECTIVES.get(name)
    if builder is None:
        raise ValueError(f"objective {name!r} is not an objective of a distill stage")
    if isinstance(builder, type):
        return builder(**kwargs)
    return builder(total_steps=total_steps, **kwargs)
