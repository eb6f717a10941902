"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv:2501.16937)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmkd.losses._common import kl_from_logprobs, rowdot, safe_log_softmax
from mmkd.losses.divergences import TokenDivergence

# What drives the adaptive update: the loss itself (the KL) or, as the official code, the cross-entropy to the target.
UPDATE_ON = ("kl", "ce")


class TAID(TokenDivergence):
    """KL from an adaptive interpolation between student and teacher to the student.

    Target ``p_t = softmax((1−t)·stopgrad(z_S) + t·z_T)`` (logits interpolated, then divided by the
    temperature), loss ``KL(p_t‖p_S)``. The interpolation ``t`` moves from ``t_start`` toward ``t_end`` by the
    paper's adaptive update, applied by :meth:`step` once per optimizer step with that step's loss value::

        δ_n = (J_{n−1} − J_n) / (J_{n−1} + ε)            relative loss change (skipped on the first step)
        m_n = β·m_{n−1} + (1−β)·δ_n                      momentum, β = 0.99
        t_{n+1} = min(t_end, max(t_lin(n), t_n + α·sigmoid(m_n)·(1 − t_n)))    α = 5e-4

    where ``t_lin(n) = t_start + (t_end − t_start)·min(1, n / total_steps)`` and ``n`` counts the steps
    taken. :meth:`forward` never changes ``t``: the caller (the LightningModule) calls ``step(loss)`` after
    computing the training loss, so validation passes do not move the schedule. ``t``, the momentum, the
    previous loss and the step count are buffers, so ``state_dict()`` (and a Lightning checkpoint of a module
    holding this loss) resumes the schedule exactly.

    **What drives the update** (``update_on``). The loss is ``KL(p_t‖p_S)``; the official code (SakanaAI/TAID,
    ``src/distil_losses/taid.py`` with DistiLLM's ``forward_kl``) optimises and feeds ``update_t`` the cross-entropy
    ``H(p_t, p_S) = −Σ_v p_t log p_S`` instead, which is ``KL(p_t‖p_S) + H(p_t)``: the same gradient (``p_t`` is
    constant) but a different value, hence a different relative change ``δ_n``. With ``update_on="ce"`` every
    per-token evaluation (full logits or chunk by chunk through :func:`mmkd.losses.chunked_token_loss`) also sums
    the target entropy ``H(p_t)`` of its rows, and :meth:`update_value` turns a computed loss into that
    cross-entropy (and clears the sum)::

        loss = taid(student_logits, teacher_logits, mask)      # or chunked_token_loss(taid, ...)
        value = taid.update_value(loss)                        # CE with update_on="ce", the loss itself with "kl"
        taid.step(value)                                       # after the optimizer step (training only)

    Call :meth:`update_value` once after each loss computation (validation too, or the sum leaks into the next).

    Args:
        total_steps: Training steps of the stage, for the linear floor; ``step(..., progress=)`` overrides it.
        t_start: Initial interpolation (paper: 0.4).
        t_end: Final interpolation (1.0: the target becomes the teacher).
        alpha: Step size of the adaptive update (paper: 5e-4).
        beta: Momentum of the relative loss change (paper: 0.99).
        adaptive: False gives the plain linear schedule (the paper's ablation).
        temperature, scale_by_t2, reduction: As in :class:`TokenDivergence`.
        update_on: ``"kl"`` (the loss) or ``"ce"`` (the official code's cross-entropy to ``p_t``; needs
            reduction ``"mean"`` or ``"sum"``), what :meth:`update_value` returns for :meth:`step`.
    """

    def __init__(
        self,
        total_steps: int,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
        temperature: float = 1.0,
        scale_by_t2: bool = False,
        reduction: str = "mean",
        update_on: str = "kl",
    ) -> None:
        super().__init__(temperature, scale_by_t2, reduction)
        if update_on not in UPDATE_ON:
            raise ValueError(f"update_on={update_on!r}: expected one of {', '.join(UPDATE_ON)}")
        if update_on == "ce" and self.reduction == "none":
            raise ValueError("update_on='ce' needs reduction 'mean' or 'sum' (a scalar loss to add the entropy to)")
        self.update_on = update_on
        # The target entropy summed over the rows evaluated since the last update_value() (update_on="ce" only);
        # plain attributes, not buffers: they belong to one loss computation, not to the schedule's state.
        self._entropy_sum: Tensor | None = None
        self._entropy_rows = 0
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: expected a positive number of training steps")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"t_start={t_start}, t_end={t_end}: expected 0 <= t_start <= t_end <= 1")
        self.total_steps = int(total_steps)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.beta = float(alpha), float(beta)
        self.adaptive = adaptive
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float64))
        self.register_buffer("momentum", torch.tensor(0.0, dtype=torch.float64))
        # NaN marks "no previous loss yet" (the first step only records the loss).
        self.register_buffer("prev_loss", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long))

    @property
    def interpolation(self) -> float:
        """The current ``t``."""
        return float(self.t)

    @torch.no_grad()
    def step(self, loss: Tensor | float, progress: float | None = None) -> float:
        """Advance the schedule after one optimizer step.

        Args:
            loss: This step's TAID loss value (detached; a tensor or a float).
            progress: Fraction of training done, for the linear floor; default ``num_steps / total_steps``.

        Returns:
            The new ``t``.
        """
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        n = int(self.num_steps)
        if progress is None:
            progress = n / self.total_steps
        t_linear = self.t_start + (self.t_end - self.t_start) * min(1.0, max(0.0, progress))
        if math.isfinite(value):
            prev = float(self.prev_loss)
            if not math.isnan(prev):
                if self.adaptive:
                    relative_change = (prev - value) / (prev + 1e-15)
                    momentum = self.beta * float(self.momentum) + (1 - self.beta) * relative_change
                    self.momentum.fill_(momentum)
                    t = float(self.t)
                    delta = self.alpha * (1.0 / (1.0 + math.exp(-momentum))) * (1.0 - t)
                    self.t.fill_(min(self.t_end, max(t_linear, t + delta)))
                else:
                    self.t.fill_(min(self.t_end, t_linear))
            self.prev_loss.fill_(value)
        self.num_steps.add_(1)
        return float(self.t)

    @torch.no_grad()
    def update_value(self, loss: Tensor | float) -> Tensor:
        """The value :meth:`step` should receive for ``loss``, the loss just computed over some tokens.

        With ``update_on="kl"``: ``loss`` itself. With ``"ce"``: the cross-entropy to the interpolated target,
        ``loss`` plus the target entropy of the rows evaluated since the last call (their mean for reduction
        ``"mean"``, their sum for ``"sum"``; times ``temperature²`` with ``scale_by_t2``), exactly the official
        code's loss value. Clears the entropy sum either way.

        Args:
            loss: The TAID loss (a detached or attached scalar tensor, or a float).

        Returns:
            Detached float32 scalar.
        """
        value = loss.detach().float() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        total, rows = self._entropy_sum, self._entropy_rows
        self._entropy_sum, self._entropy_rows = None, 0
        if self.update_on == "kl" or total is None:
            return value
        entropy = total if self.reduction == "sum" else total / max(rows, 1)
        if self.scale_by_t2:
            entropy = entropy * self.temperature**2
        return value + entropy.to(device=value.device, dtype=value.dtype)

    @torch.no_grad()
    def _record_entropy(self, target_logp: Tensor) -> None:
        # H(p_t) has no gradient (p_t is built from detached logits): CE = KL + H(p_t) in value only. Floored -inf
        # entries give p = 0 and 0·(-1e30) = 0. A row dot product keeps it to one (n, V) temporary.
        rows = target_logp.reshape(-1, target_logp.shape[-1])
        entropy = -rowdot(rows.exp(), rows).sum(dtype=torch.float64)
        self._entropy_sum = entropy if self._entropy_sum is None else self._entropy_sum + entropy
        self._entropy_rows += int(target_logp.shape[:-1].numel())

    def divergence(self, logp: Tensor, teacher_logp: Tensor, logits: Tensor) -> Tensor:
        raise NotImplementedError  # per_token is overridden: TAID interpolates logits, not log-probabilities

    def per_token(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``KL(p_t‖p_S)`` per row, ``(N, V), (N, V) -> (N,)`` float32; see :meth:`TokenDivergence.per_token`."""
        self._check_shapes(student_logits, teacher_logits)
        t = float(self.t)
        logits = student_logits.float()
        teacher_logits = teacher_logits.detach().float()
        # -inf entries (masked vocabulary) stay -inf in the mix; 0·(-inf) would be NaN, so skip a zero weight.
        if t >= 1.0:
            mixed = teacher_logits
        elif t <= 0.0:
            mixed = logits.detach()
        else:
            mixed = (1.0 - t) * logits.detach() + t * teacher_logits
        logp = safe_log_softmax(logits / self.temperature)
        target_logp = safe_log_softmax(mixed / self.temperature)
        values = kl_from_logprobs(target_logp, logp)
        if self.update_on == "ce":
            self._record_entropy(target_logp)
        return values * self.temperature**2 if self.scale_by_t2 else values

    def extra_repr(self) -> str:
        return (
            f"total_steps={self.total_steps}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
            f"beta={self.beta}, adaptive={self.adaptive}, update_on={self.update_on!r}, " + super().extra_repr()
        )
