"""Token-level divergences between teacher and student next-token distributions.

Every objective here shares one calling convention (see :class:`TokenDivergence`): logits of both sides,
the positions to compare, float32 math whatever the input dtype, and a mean over the selected tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmkd.losses._common import (
    LOG_FLOOR,
    check_reduction,
    kl_from_logprobs,
    kl_to_constant,
    log_mixture,
    reduce,
    row_slices,
    safe_log_softmax,
    select_tokens,
)


class TokenDivergence(nn.Module):
    """Base of the token-level objectives: token selection, temperature, float32 math and reduction.

    Subclasses implement :meth:`divergence` on log-probabilities. The teacher side is always treated as a
    constant (detached): gradients reach the student only.

    Args:
        temperature: Divides both sides' logits before the softmax.
        scale_by_t2: Multiply the loss by ``temperature**2`` (Hinton et al., 2015) so gradient magnitudes do
            not shrink as the temperature grows.
        reduction: ``"mean"`` over selected tokens (default), ``"sum"``, or ``"none"`` (per-token ``(N,)``).
    """

    def __init__(self, temperature: float = 1.0, scale_by_t2: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}: expected a positive number")
        self.temperature = float(temperature)
        self.scale_by_t2 = scale_by_t2
        self.reduction = check_reduction(reduction)

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        """The divergence per row from float32 log-probabilities at the loss temperature.

        Args:
            logp: Student log-probabilities ``(N, V)``.
            teacher_logp: Teacher log-probabilities ``(N, V)`` (no gradient).
            logits: Student logits at the loss temperature ``(N, V)``, for objectives that need them.

        Returns:
            ``(N,)``.
        """
        raise NotImplementedError

    @staticmethod
    def _check_shapes(student_logits: Tensor, teacher_logits: Tensor) -> None:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "must have the same shape (same tokens, same vocabulary)"
            )

    def per_token_and_grad(
        self, student_logits: Tensor, teacher_logits: Tensor, owned: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-token values and the gradient of their sum w.r.t. ``student_logits``, for the chunked path.

        Args:
            student_logits: ``(n, V)``.
            teacher_logits: ``(n, V)``.
            owned: The caller hands both tensors over: they may be overwritten (saves memory).

        Returns:
            Detached values ``(n,)`` float32 and the gradient ``(n, V)`` float32.
        """
        with torch.enable_grad():
            logits = student_logits.detach().float().requires_grad_()
            values = self.per_token(logits, teacher_logits)
            (grad,) = torch.autograd.grad(values.sum(), logits)
        return values.detach(), grad

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The objective on already-selected, aligned rows (used by the chunked path and the modules).

        Args:
            student_logits: ``(N, V)``, any float dtype.
            teacher_logits: ``(N, V)``; detached here.

        Returns:
            ``(N,)`` float32 values, before reduction, including the optional ``T²`` factor.
        """
        self._check_shapes(student_logits, teacher_logits)
        logits = student_logits.float()
        teacher_logits = teacher_logits.detach().float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
            teacher_logits = teacher_logits / self.temperature
        values = self.divergence(safe_log_softmax(logits), safe_log_softmax(teacher_logits), logits)
        return values * self.temperature**2 if self.scale_by_t2 else values

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor,
        teacher_mask: Tensor | None = None,
    ) -> Tensor:
        """The objective over the selected tokens.

        Args:
            student_logits: ``(B, T, V)``.
            teacher_logits: ``(B, T', V)``.
            mask: ``(B, T)`` bool, the student positions to compare (answer tokens).
            teacher_mask: ``(B, T')`` bool, the teacher positions of the same tokens; None when ``mask``
                selects both (``T' == T``). Each sample must select the same count on both sides.

        Returns:
            Scalar float32 (``(N,)`` with ``reduction="none"``).
        """
        student_rows, teacher_rows = select_tokens(student_logits, teacher_logits, mask, teacher_mask)
        return reduce(self.per_token(student_rows, teacher_rows), self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, scale_by_t2={self.scale_by_t2}, reduction={self.reduction!r}"


class ForwardKL(TokenDivergence):
    """Forward KL, ``KL(p_T‖p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))`` (Hinton et al., 2015).

    Mean-seeking: the student spreads mass over everything the teacher considers likely.
    """

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        return kl_to_constant(teacher_logp, logp)

    def per_token_and_grad(
        self, student_logits: Tensor, teacher_logits: Tensor, owned: bool = False
    ) -> tuple[Tensor, Tensor]:
        # Closed form d KL(p_T‖softmax(z/T)) / dz = (softmax(z/T) − p_T) / T. With owned=True (the chunked path
        # passes logits it just computed) everything happens in place in the two logits tensors, plus
        # temporaries of a few rows: two (chunk, V) tensors at the peak instead of the dozen autograd would keep.
        self._check_shapes(student_logits, teacher_logits)
        tau = self.temperature
        student_inf = student_logits.numel() > 0 and bool(student_logits.detach().amin() == float("-inf"))
        inf_mask = student_logits.detach() == float("-inf") if student_inf else None
        logp = _own_float(student_logits, owned)
        teacher_logp = _own_float(teacher_logits, owned)
        del student_logits, teacher_logits
        for x in (logp, teacher_logp):
            if tau != 1.0:
                x.div_(tau)
            torch.log_softmax(x, dim=-1, out=x)
            if x.numel() and bool(x.amin() < LOG_FLOOR):
                x.clamp_(min=LOG_FLOOR)
        values = torch.empty(logp.shape[:-1], dtype=torch.float32, device=logp.device)
        for rows in row_slices(logp.shape[0], max(1, (4 << 20) // (4 * max(logp.shape[-1], 1)))):  # ~4 MiB blocks
            values[rows] = kl_to_constant(teacher_logp[rows], logp[rows])
        grad = logp.exp_().sub_(teacher_logp.exp_())
        del teacher_logp
        if inf_mask is not None:
            grad.masked_fill_(inf_mask, 0.0)  # as autograd through the floor: no gradient at -inf logits
        factor = tau if self.scale_by_t2 else 1.0 / tau
        if factor != 1.0:
            grad.mul_(factor)
        return (values * tau**2 if self.scale_by_t2 else values), grad


def _own_float(x: Tensor, owned: bool) -> Tensor:
    """``x`` as a float32 tensor that may be modified in place (a copy unless ``owned`` and already float32)."""
    x = x.detach()
    if x.dtype != torch.float32:
        return x.float()
    return x if owned else x.clone()


class ReverseKL(TokenDivergence):
    """Reverse KL, ``KL(p_S‖p_T)`` (MiniLLM, Gu et al., 2024). Mode-seeking: the student picks the
    teacher's main modes instead of covering its tail."""

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        return kl_from_logprobs(logp, teacher_logp)


class JSD(TokenDivergence):
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al., 2024).

    ``JSD(β) = β·KL(p_T‖m) + (1−β)·KL(p_S‖m)`` with ``m = β·p_T + (1−β)·p_S``; ``β = 0.5`` is the usual
    symmetric JSD (bounded by ``log 2``). Both limits of the value are 0, but ``JSD(β)/β → KL(p_T‖p_S)``
    as ``β → 0`` and ``JSD(β)/(1−β) → KL(p_S‖p_T)`` as ``β → 1``: small β behaves like forward KL, large β
    like reverse KL. Use :class:`ForwardKL` / :class:`ReverseKL` for the endpoints themselves.

    Args:
        beta: Teacher weight of the mixture, strictly between 0 and 1.
        temperature, scale_by_t2, reduction: As in :class:`TokenDivergence`.
    """

    def __init__(
        self, beta: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__(temperature, scale_by_t2, reduction)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta={beta}: expected 0 < beta < 1 (use ForwardKL / ReverseKL for the limits)")
        self.beta = float(beta)

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        log_m = log_mixture(teacher_logp, logp, self.beta)
        return self.beta * kl_from_logprobs(teacher_logp, log_m) + (1 - self.beta) * kl_from_logprobs(logp, log_m)


class TotalVariation(TokenDivergence):
    """Total variation distance, ``TV = ½ Σ_v |p_T(v) − p_S(v)|`` (in [0, 1]; Wen et al., 2023 f-divergence KD)."""

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        return 0.5 * (teacher_logp.exp() - logp.exp()).abs().sum(-1)


class _Skewed(TokenDivergence):
    """A divergence to a mixture of the two distributions with skew ``alpha`` (``0 <= alpha < 1``)."""

    def __init__(
        self, alpha: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__(temperature, scale_by_t2, reduction)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha={alpha}: expected 0 <= alpha < 1")
        self.alpha = float(alpha)


class SkewKL(_Skewed):
    """α-skew forward KL, ``KL(p_T ‖ α·p_T + (1−α)·p_S)`` (DistiLLM, Ko et al., 2024).

    Skewing the student toward the teacher keeps the divergence finite and its gradient well conditioned
    when the student gives near-zero mass to a teacher token. ``α = 0`` is forward KL.

    Args:
        alpha: Skew, ``0 <= alpha < 1`` (DistiLLM uses 0.1).
        temperature, scale_by_t2, reduction: As in :class:`TokenDivergence`.
    """

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        log_m = logp if self.alpha == 0 else log_mixture(teacher_logp, logp, self.alpha)
        return kl_from_logprobs(teacher_logp, log_m)


class SkewReverseKL(_Skewed):
    """α-skew reverse KL, ``KL(p_S ‖ α·p_S + (1−α)·p_T)`` (DistiLLM, Ko et al., 2024). ``α = 0`` is reverse KL.

    Args:
        alpha: Skew, ``0 <= alpha < 1`` (DistiLLM uses 0.1).
        temperature, scale_by_t2, reduction: As in :class:`TokenDivergence`.
    """

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        log_m = teacher_logp if self.alpha == 0 else log_mixture(logp, teacher_logp, self.alpha)
        return kl_from_logprobs(logp, log_m)


def build_divergence(name: str, **kwargs: float | bool | str) -> TokenDivergence:
    """A token divergence by short name: ``fkl``, ``rkl``, ``jsd``, ``tv``, ``skl``, ``srkl``."""
    table: dict[str, type[TokenDivergence]] = {
        "fkl": ForwardKL,
        "rkl": ReverseKL,
        "jsd": JSD,
        "tv": TotalVariation,
        "skl": SkewKL,
        "srkl": SkewReverseKL,
    }
    if name not in table:
        raise ValueError(f"divergence {name!r}: expected one of {', '.join(table)}")
    return table[name](**kwargs)


__all__ = [
    "JSD",
    "ForwardKL",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "TokenDivergence",
    "TotalVariation",
    "build_divergence",
]
