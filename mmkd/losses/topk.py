"""Forward KL from sparse teacher targets: the teacher's top-k token ids and log-probabilities per position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.losses._common import LOG_FLOOR, check_reduction, reduce, safe_log_softmax, token_masks

TAILS = ("bucket", "renormalize")


class TopKKL(nn.Module):
    """Forward KL to a teacher stored as top-k entries (teacher caches).

    The teacher's distribution is known only on its top-k ids; the rest of its mass is handled by ``tail``:

    * ``"bucket"`` (default): both distributions are coarsened to K + 1 outcomes, the K ids plus one tail
      bucket holding all remaining mass (teacher: ``1 − Σ_k p_T(k)``; student: its exact mass outside the K
      ids). The loss is the exact KL between the coarsened distributions: zero when the student equals the
      teacher, and it still pushes the student's total mass on the K ids toward the teacher's.
    * ``"renormalize"``: both sides are restricted to the K ids and renormalized, and the loss is the KL
      between these conditional distributions. Zero at equality; ignores how much mass the student puts
      outside the K ids (only their relative odds are matched). Works with any temperature.

    The stored log-probabilities are the teacher's at temperature 1. With ``"renormalize"`` a temperature
    divides both the student's logits and the teacher's log-probabilities (a renormalized tempered top-k);
    ``"bucket"`` needs the untempered tail mass, so it requires ``temperature == 1``.

    Ids must be distinct within a row; an entry whose log-probability is ``-inf`` is a token the teacher
    gives zero mass.

    Args:
        tail: ``"bucket"`` or ``"renormalize"``.
        temperature: See above.
        scale_by_t2: Multiply by ``temperature**2``.
        reduction: ``"mean"`` over selected tokens, ``"sum"`` or ``"none"``.
    """

    def __init__(
        self, tail: str = "bucket", temperature: float = 1.0, scale_by_t2: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if tail not in TAILS:
            raise ValueError(f"tail={tail!r}: expected one of {', '.join(TAILS)}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}: expected a positive number")
        if tail == "bucket" and temperature != 1.0:
            raise ValueError(f"tail='bucket' needs temperature=1 (got {temperature}); use tail='renormalize'")
        self.tail = tail
        self.temperature = float(temperature)
        self.scale_by_t2 = scale_by_t2
        self.reduction = check_reduction(reduction)

    def per_token(self, student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor,
                  teacher_log_tail: Tensor | None = None) -> Tensor:
        """The objective on already-selected rows.

        Args:
            student_logits: ``(N, V)``, any float dtype.
            teacher_indices: ``(N, K)`` long, distinct ids per row.
            teacher_logprobs: ``(N, K)``, the teacher's log-probabilities at those ids (temperature 1).
            teacher_log_tail: ``(N,)``, the log of the teacher's mass outside the top-k (a teacher cache stores it,
                :func:`topk_from_logits` returns it); None takes ``1 - Σ_k p_T(k)``, which loses precision when the
                tail is tiny or the log-probs are quantized. Only the ``bucket`` tail reads it.

        Returns:
            ``(N,)`` float32.
        """
        if teacher_indices.shape != teacher_logprobs.shape or teacher_indices.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"teacher top-k ids {tuple(teacher_indices.shape)} and log-probs {tuple(teacher_logprobs.shape)} "
                f"must both be (N, K) with N = {student_logits.shape[0]} student rows"
            )
        idx = teacher_indices.long()
        teacher_lp = teacher_logprobs.detach().float()
        logits = student_logits.float()
        if self.tail == "renormalize":
            if self.temperature != 1.0:
                logits, teacher_lp = logits / self.temperature, teacher_lp / self.temperature
            teacher_logq = safe_log_softmax(teacher_lp)
            logq = safe_log_softmax(logits.gather(1, idx))
            values = (teacher_logq.exp() * (teacher_logq - logq)).sum(-1)
            return values * self.temperature**2 if self.scale_by_t2 else values

        logp = safe_log_softmax(logits)
        top_logp = logp.gather(1, idx)
        # The student's exact tail mass: logsumexp over the ids not in the top-k (set to the floor, not -inf,
        # so a row whose top-k covers the whole vocabulary still has a finite gradient).
        tail_logp = torch.logsumexp(logp.scatter(1, idx, LOG_FLOOR), dim=-1).clamp(min=LOG_FLOOR)
        teacher_lp = teacher_lp.clamp(min=LOG_FLOOR)
        teacher_p = teacher_lp.exp()
        if teacher_log_tail is None:
            teacher_tail = (1.0 - teacher_p.sum(-1)).clamp(min=0.0)
            teacher_tail_lp = torch.log(teacher_tail).clamp(min=LOG_FLOOR)
        else:
            teacher_tail_lp = teacher_log_tail.detach().float().clamp(min=LOG_FLOOR)
            teacher_tail = teacher_tail_lp.exp()
        values = (teacher_p * (teacher_lp - top_logp)).sum(-1) + teacher_tail * (teacher_tail_lp - tail_logp)
        return values

    def per_token_and_grad(
        self, student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor,
        teacher_log_tail: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Values ``(n,)`` and the gradient of their sum w.r.t. ``student_logits`` ``(n, V)``, both float32."""
        with torch.enable_grad():
            logits = student_logits.detach().float().requires_grad_()
            values = self.per_token(logits, teacher_indices, teacher_logprobs, teacher_log_tail)
            (grad,) = torch.autograd.grad(values.sum(), logits)
        return values.detach(), grad

    def forward(
        self,
        student_logits: Tensor,
        teacher_indices: Tensor,
        teacher_logprobs: Tensor,
        mask: Tensor,
        teacher_mask: Tensor | None = None,
    ) -> Tensor:
        """The objective over the selected tokens.

        Args:
            student_logits: ``(B, T, V)``.
            teacher_indices: ``(B, T', K)``.
            teacher_logprobs: ``(B, T', K)``.
            mask: ``(B, T)`` bool.
            teacher_mask: ``(B, T')`` bool, or None when ``mask`` selects both sides.

        Returns:
            Scalar float32 (``(N,)`` with ``reduction="none"``).
        """
        mask, teacher_mask = token_masks(tuple(student_logits.shape), tuple(teacher_indices.shape), mask, teacher_mask)
        values = self.per_token(student_logits[mask], teacher_indices[teacher_mask], teacher_logprobs[teacher_mask])
        return reduce(values, self.reduction)

    def extra_repr(self) -> str:
        return f"tail={self.tail!r}, temperature={self.temperature}, reduction={self.reduction!r}"


def topk_from_logits(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids, float32 log-probabilities and log tail mass of full teacher logits.

    ``(..., V) -> (..., K), (..., K), (...)``: ids by decreasing probability, their log-probabilities, and the log of
    the probability outside them as a log-sum-exp over the other ids (precise however small the tail). A teacher cache
    stores exactly these (``mmkd.cache.teacher_topk`` is this function).
    """
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    values, indices = logp.topk(k, dim=-1)
    log_tail = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return indices, values, log_tail
