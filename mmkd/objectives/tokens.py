"""Objectives over answer tokens: the LM loss, token divergences to the teacher (chunked), hidden-state distillation.

Neither side's ``(tokens, V)`` logits exist whole in the divergences: :func:`mmkd.losses.chunked_token_loss`
recomputes them chunk by chunk from the final hidden states and LM heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.contract import DistillBatch, ModelOutput
from mmkd.losses import (
    JSD,
    TAID,
    FeatureDistill,
    ForwardKL,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    TokenDivergence,
    TopKKL,
    TotalVariation,
    chunked_token_loss,
    topk_from_logits,
)
from mmkd.losses._common import row_slices
from mmkd.losses.chunked import default_chunk_size
from mmkd.objectives.base import Objective, answer_positions, answer_targets, check_counts
from mmkd.objectives.head import HeadTerm, cross_entropy_and_grad, fused_head_terms

__all__ = [
    "FeatureObjective",
    "ForwardKLObjective",
    "JSDObjective",
    "LanguageModeling",
    "ReverseKLObjective",
    "SkewKLObjective",
    "SkewReverseKLObjective",
    "TAIDObjective",
    "TokenDivergenceObjective",
    "TopKKLObjective",
    "TotalVariationObjective",
    "answer_topk",
]

# Tokens per chunk of logits: at most 1,024 rows (the demo's figures were measured with it) and at most about 64 MiB
# of float32 logits per side (110 rows at V = 151,936: 1,024 rows there would be 622 MB per chunk and side).
DEFAULT_CHUNK = 1024


def chunk_rows(chunk_size: int | None, vocab_size: int) -> int:
    """Rows per chunk of ``(rows, V)`` logits: ``chunk_size`` when given, else the default above."""
    return int(chunk_size) if chunk_size is not None else min(DEFAULT_CHUNK, default_chunk_size(vocab_size))


class LanguageModeling(Objective):
    """Cross-entropy of the student on the answer tokens (``lm``), logits computed at answer positions only."""

    needs_teacher = False

    def head_term(self, student: ModelOutput, teacher: ModelOutput | None, batch: DistillBatch) -> HeadTerm:
        """This objective's part of a fused head pass (:mod:`mmkd.objectives.head`)."""
        mask = answer_positions(batch.labels)
        targets = answer_targets(batch.labels)
        return HeadTerm(mask, lambda logits, rows, grad: cross_entropy_and_grad(logits, targets[rows], grad),
                        1.0 / max(1, int(targets.shape[0])), chunk_rows(None, student.head_weight.shape[0]))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: DistillBatch) -> Tensor:
        labels = batch.labels
        hidden = student.last_hidden[answer_positions(labels)]
        if hidden.shape[0] == 0:  # no answer token in the batch (a generated answer cut to nothing): no loss
            return student.last_hidden.sum().float() * 0.0
        if hidden.shape[0] > chunk_rows(None, student.head_weight.shape[0]):
            # More rows than one chunk of logits: chunk by chunk, as in a fused pass (no (tokens, V) logits).
            values, carrier = fused_head_terms(student, {"lm": self.head_term(student, teacher, batch)}, {"lm": 1.0})
            return values["lm"] + carrier
        logits = student.logits(hidden).float()  # no larger than one chunk
        return F.cross_entropy(logits, answer_targets(labels))


class TokenDivergenceObjective(Objective):
    """A token divergence between the teacher's and the student's next-token distributions on answer tokens.

    Args:
        loss: The divergence (reduction ``"mean"``).
        chunk_size: Answer tokens per chunk of logits.
    """

    fusable: ClassVar[bool] = True  # its value and gradient can share a head pass (mmkd.objectives.head)

    def __init__(self, loss: TokenDivergence, chunk_size: int | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.chunk_size = chunk_size

    def head_term(self, student: ModelOutput, teacher: ModelOutput, batch: DistillBatch) -> HeadTerm:
        """This objective's part of a fused head pass (:mod:`mmkd.objectives.head`)."""
        s_mask = answer_positions(batch.labels)
        t_mask = answer_positions(batch.teacher_side()[1])
        check_counts(s_mask, t_mask)
        t_hidden = teacher.last_hidden[t_mask].detach()
        loss = self.loss

        def fn(logits: Tensor, rows: slice, grad: bool) -> tuple[Tensor, Tensor | None]:
            with torch.no_grad():
                t_logits = teacher.logits(t_hidden[rows]).detach()
            if not grad:
                return loss.per_token(logits, t_logits).sum(), None
            values, g = loss.per_token_and_grad(logits, t_logits, owned=True)
            return values.sum(), g

        scale = 1.0 / max(1, int(s_mask.sum())) if loss.reduction == "mean" else 1.0
        return HeadTerm(s_mask, fn, scale, chunk_rows(self.chunk_size, student.head_weight.shape[0]))

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: DistillBatch) -> Tensor:
        s_mask = answer_positions(batch.labels)
        t_mask = answer_positions(batch.teacher_side()[1])
        check_counts(s_mask, t_mask)
        return chunked_token_loss(
            self.loss,
            student.last_hidden[s_mask],
            student.head_weight,
            teacher.last_hidden[t_mask].detach(),
            teacher.head_weight.detach(),
            chunk_size=chunk_rows(self.chunk_size, student.head_weight.shape[0]),
        )


class ForwardKLObjective(TokenDivergenceObjective):
    """``kl`` / ``fkl``: forward KL(p_T‖p_S) (Hinton et al., 2015).

    Args:
        temperature: Divides both sides' logits.
        scale_by_t2: Multiply by ``temperature**2``.
        chunk_size: Answer tokens per chunk of logits.
    """

    def __init__(self, temperature: float = 1.0, scale_by_t2: bool = False, chunk_size: int | None = None) -> None:
        super().__init__(ForwardKL(temperature, scale_by_t2), chunk_size)


class ReverseKLObjective(TokenDivergenceObjective):
    """``rkl``: reverse KL(p_S‖p_T) (MiniLLM). Arguments as :class:`ForwardKLObjective`."""

    def __init__(self, temperature: float = 1.0, scale_by_t2: bool = False, chunk_size: int | None = None) -> None:
        super().__init__(ReverseKL(temperature, scale_by_t2), chunk_size)


class TotalVariationObjective(TokenDivergenceObjective):
    """``tvd``: total variation distance. Arguments as :class:`ForwardKLObjective`."""

    def __init__(self, temperature: float = 1.0, scale_by_t2: bool = False, chunk_size: int | None = None) -> None:
        super().__init__(TotalVariation(temperature, scale_by_t2), chunk_size)


class JSDObjective(TokenDivergenceObjective):
    """``jsd``: generalized Jensen-Shannon divergence JSD(β) (GKD).

    Args:
        beta: Teacher weight of the mixture, strictly between 0 and 1.
        temperature: Divides both sides' logits.
        scale_by_t2: Multiply by ``temperature**2``.
        chunk_size: Answer tokens per chunk of logits.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = False,
                 chunk_size: int | None = None) -> None:
        super().__init__(JSD(beta, temperature, scale_by_t2), chunk_size)


class SkewKLObjective(TokenDivergenceObjective):
    """``skl``: α-skew forward KL (DistiLLM).

    Args:
        alpha: Skew, ``0 <= alpha < 1``.
        temperature: Divides both sides' logits.
        scale_by_t2: Multiply by ``temperature**2``.
        chunk_size: Answer tokens per chunk of logits.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = False,
                 chunk_size: int | None = None) -> None:
        super().__init__(SkewKL(alpha, temperature, scale_by_t2), chunk_size)


class SkewReverseKLObjective(TokenDivergenceObjective):
    """``srkl``: α-skew reverse KL (DistiLLM). Arguments as :class:`SkewKLObjective`."""

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = False,
                 chunk_size: int | None = None) -> None:
        super().__init__(SkewReverseKL(alpha, temperature, scale_by_t2), chunk_size)


class TAIDObjective(TokenDivergenceObjective):
    """``taid``: KL from the adaptive student-teacher interpolation to the student (TAID, Shing et al., 2025).

    The interpolation advances once per optimizer step on this term's mean over the global batch.

    Args:
        total_steps: The stage's optimizer steps (filled in by the stage), for the linear floor.
        t_start: Initial interpolation.
        t_end: Final interpolation.
        alpha: Step size of the adaptive update.
        beta: Momentum of the relative loss change.
        adaptive: False gives the linear schedule.
        temperature: Divides both sides' logits.
        scale_by_t2: Multiply by ``temperature**2``.
        chunk_size: Answer tokens per chunk of logits.
        update_on: What drives the adaptive update: ``kl`` (this term) or ``ce`` (the cross-entropy to the
            interpolated target, KL + its entropy: TAID's released code).
    """

    context: ClassVar[dict[str, str]] = {"total_steps": "total_steps"}
    fusable: ClassVar[bool] = False  # its forward also records the value its schedule steps on

    def __init__(self, total_steps: int, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, adaptive: bool = True, temperature: float = 1.0, scale_by_t2: bool = False,
                 chunk_size: int | None = None, update_on: Literal["kl", "ce"] = "kl") -> None:
        super().__init__(TAID(total_steps, t_start, t_end, alpha, beta, adaptive, temperature, scale_by_t2,
                              update_on=update_on), chunk_size)
        self._update: Tensor | None = None

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: DistillBatch) -> Tensor:
        value = super().forward(student, teacher, batch)
        if self.loss.update_on != "kl":
            self._update = self.loss.update_value(value)  # also clears the entropy of these rows
        return value

    def extras(self) -> dict[str, Tensor]:
        if self._update is None:
            return {}
        value, self._update = self._update, None
        return {"update": value}

    def on_optimizer_step(self, value: Tensor, extras: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        # The update's value: this term's global mean, or (update_on="ce") the global mean of its cross-entropy.
        self.loss.step((extras or {}).get("update", value).detach())
        return {"t": float(self.loss.interpolation)}


def answer_topk(output: ModelOutput, mask: Tensor, k: int, chunk_size: int | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """A model's top-k at the selected positions, logits computed ``chunk_size`` rows at a time.

    Args:
        output: The (teacher's) forward output.
        mask: ``(B, T)`` bool, the positions (row-major order).
        k: Entries per position.
        chunk_size: Rows of logits at a time (default: :func:`chunk_rows`).

    Returns:
        ids ``(N, k)`` long, log-probabilities ``(N, k)`` float32, log tail ``(N,)`` float32
        (:func:`mmkd.losses.topk_from_logits`): what ``mmkd cache`` stores and what ``topk_kl`` computes live.
    """
    hidden = output.last_hidden[mask].detach()
    rows_per_chunk = chunk_rows(chunk_size, output.head_weight.shape[0])
    with torch.no_grad():
        parts = [topk_from_logits(output.logits(hidden[rows]), k)
                 for rows in row_slices(hidden.shape[0], rows_per_chunk)]
    if not parts:
        return (torch.zeros(0, k, dtype=torch.long, device=hidden.device),
                torch.zeros(0, k, dtype=torch.float32, device=hidden.device),
                torch.zeros(0, dtype=torch.float32, device=hidden.device))
    ids, logprobs, log_tail = (torch.cat(p) for p in zip(*parts))
    return ids, logprobs, log_tail


class TopKKLObjective(Objective):
    """``topk_kl``: forward KL to the teacher's top-k distribution on answer tokens, live or from a teacher cache.

    With a live teacher its top-k is taken from its logits chunk by chunk (:func:`mmkd.losses.topk_from_logits`); in
    a stage that reads a teacher cache (``task_args.teacher_cache``) the batch carries the stored top-k and the
    teacher is never loaded. Either way the student's logits exist a chunk at a time (:func:`chunked_token_loss`)
    and the same numbers reach :class:`mmkd.losses.TopKKL`: the cache stores exactly what the live path computes.

    Args:
        k: Top-k entries per position. Live: default 64. From a cache: None takes the cache's k; a number must
            equal it (checked before training).
        tail: ``bucket`` (the teacher's mass outside the top-k as one more outcome) or ``renormalize``.
        temperature: Divides both sides (``renormalize`` only).
        scale_by_t2: Multiply by ``temperature**2``.
        chunk_size: Answer tokens per chunk of logits.
    """

    reads_cache = True
    LIVE_K = 64

    def __init__(self, k: int | None = None, tail: Literal["bucket", "renormalize"] = "bucket",
                 temperature: float = 1.0, scale_by_t2: bool = False, chunk_size: int | None = None) -> None:
        super().__init__()
        if k is not None and k < 1:
            raise ValueError(f"k={k}: expected a positive number of entries per position")
        self.k = k
        self.loss = TopKKL(tail=tail, temperature=temperature, scale_by_t2=scale_by_t2)
        self.chunk_size = chunk_size

    def _targets(self, teacher: ModelOutput | None, batch: DistillBatch, s_mask: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        if teacher is not None:
            t_mask = answer_positions(batch.teacher_side()[1])
            check_counts(s_mask, t_mask)
            return answer_topk(teacher, t_mask, self.k or self.LIVE_K, self.chunk_size)
        if batch.teacher_topk is not None:
            top = batch.teacher_topk
            return top.ids, top.logprobs, top.log_tail
        raise ValueError("topk_kl: the batch has neither a teacher's output nor a teacher cache's top-k")

    def head_term(self, student: ModelOutput, teacher: ModelOutput | None, batch: DistillBatch) -> HeadTerm:
        """This objective's part of a fused head pass (:mod:`mmkd.objectives.head`)."""
        s_mask = answer_positions(batch.labels)
        ids, logprobs, log_tail = self._targets(teacher, batch, s_mask)
        n = int(s_mask.sum())
        if ids.shape[0] != n:
            raise ValueError(f"topk_kl: {n} student answer tokens but {ids.shape[0]} teacher rows")
        loss = self.loss

        def fn(logits: Tensor, rows: slice, grad: bool) -> tuple[Tensor, Tensor | None]:
            if not grad:
                return loss.per_token(logits, ids[rows], logprobs[rows], log_tail[rows]).sum(), None
            values, g = loss.per_token_and_grad(logits, ids[rows], logprobs[rows], log_tail[rows])
            return values.sum(), g

        return HeadTerm(s_mask, fn, 1.0 / max(1, n) if loss.reduction == "mean" else 1.0,
                        chunk_rows(self.chunk_size, student.head_weight.shape[0]))

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: DistillBatch) -> Tensor:
        s_mask = answer_positions(batch.labels)
        ids, logprobs, log_tail = self._targets(teacher, batch, s_mask)
        hidden = student.last_hidden[s_mask]
        if ids.shape[0] != hidden.shape[0]:
            raise ValueError(f"topk_kl: {hidden.shape[0]} student answer tokens but {ids.shape[0]} teacher rows")
        return chunked_token_loss(self.loss, hidden, student.head_weight, head_bias=student.head_bias,
                                  teacher_topk_indices=ids, teacher_topk_logprobs=logprobs,
                                  teacher_topk_log_tail=log_tail,
                                  chunk_size=chunk_rows(self.chunk_size, student.head_weight.shape[0]))


class FeatureObjective(Objective):
    """``feature``: hidden-state distillation on answer tokens through a learned projector when widths differ.

    Args:
        student_dim: Student hidden width (filled in from the student).
        teacher_dim: Teacher hidden width (filled in from the teacher).
        kind: ``mse`` or ``cosine``.
        project: Force a projector even for equal widths.
    """

    context: ClassVar[dict[str, str]] = {"student_dim": "student.hidden_size", "teacher_dim": "teacher.hidden_size"}

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse", project: bool = False) -> None:
        super().__init__()
        self.loss: nn.Module = FeatureDistill(student_dim, teacher_dim, kind=kind, project=project)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: DistillBatch) -> Tensor:
        s_mask = answer_positions(batch.labels)
        t_mask = answer_positions(batch.teacher_side()[1])
        check_counts(s_mask, t_mask)
        return self.loss(student.last_hidden[s_mask], teacher.last_hidden[t_mask].detach())
