"""Token objectives over chunks of tokens together with the LM heads, so no ``(tokens, V)`` logits exist whole.

The student's logits of one chunk are computed from its hidden states and head, the objective and its
gradient w.r.t. those logits are taken right away, and the gradients of the hidden states, head weight and
bias are accumulated in place into one buffer each (``addmm_`` into a single ``(V, H)`` buffer). Computing
the gradients in the forward pass means no logits are recomputed in the backward pass, so a chunked
forward+backward costs the same matmuls as the naive one. The backward pass only scales the buffers by the
incoming gradient. Outside autograd (``torch.no_grad()`` or nothing requiring a gradient) only the value is
computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mmkd.losses._common import row_slices, token_masks
from mmkd.losses.divergences import TokenDivergence
from mmkd.losses.topk import TopKKL

# A chunk's contribution: (student logits of the chunk (n, V), the chunk's number, whether the gradient is
# needed) -> (the objective summed over the chunk's rows, its gradient w.r.t. the logits (n, V) or None).
ChunkObjective = Callable[[Tensor, int, bool], tuple[Tensor, Tensor | None]]

# Default chunk: about 64 MiB per (chunk, V) float32 tensor (110 tokens at V = 151,936).
_CHUNK_BYTES = 64 << 20


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one ``(chunk, V)`` float32 tensor takes about 64 MiB."""
    return max(1, _CHUNK_BYTES // (4 * vocab_size))


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


class _FusedHeadLoss(torch.autograd.Function):
    """``Σ_i scale · fn(hidden[group_i] @ weightᵀ + bias, i)`` with gradients accumulated during the forward pass."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        groups: Sequence[slice | Tensor],
        fn: ChunkObjective,
        scale: float,
    ) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # The weight gradient is accumulated in float32 even for a bf16/fp16 head; for a float32 head this is
        # the final gradient tensor itself (no copy). The first chunk writes it (no zero fill of a (V, H) buffer).
        grad_weight: Tensor | None = None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Under autocast (bf16-mixed) a float32 product would come out in bf16: the accumulators stay float32.
        no_autocast = torch.autocast(device_type=hidden.device.type, enabled=False)
        for i, group in enumerate(groups):
            h = hidden[group]
            value, grad_logits = fn(_chunk_logits(h, weight, bias), i, True)
            total += value.float() * scale
            if scale != 1.0:
                grad_logits.mul_(scale)
            if grad_hidden is not None:
                grad_h = grad_logits.to(weight.dtype) @ weight
                if isinstance(group, slice):
                    grad_hidden[group] += grad_h
                else:
                    grad_hidden.index_add_(0, group, grad_h.to(hidden.dtype))
                del grad_h
            if need_weight:
                with no_autocast:
                    if grad_weight is None:
                        grad_weight = torch.mm(grad_logits.float().t(), h.float())
                    else:
                        grad_weight.addmm_(grad_logits.float().t(), h.float())
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
            # No name may keep this chunk's (n, V) gradient alive into the next chunk.
            del grad_logits, h
        if need_weight and grad_weight is None:  # no rows at all
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.grads
        # Drop ctx's references so autograd can adopt the buffers as .grad without copying them.
        ctx.grads = None
        out: list[Tensor | None] = []
        for grad, dtype in ((grad_hidden, None), (grad_weight, ctx.weight_dtype), (grad_bias, ctx.bias_dtype)):
            if grad is None:
                out.append(None)
                continue
            grad.mul_(grad_output.to(grad.dtype))
            out.append(grad if dtype is None or grad.dtype == dtype else grad.to(dtype))
        return (*out, None, None, None)


def fused_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    groups: Sequence[slice | Tensor],
    fn: ChunkObjective,
    scale: float = 1.0,
) -> Tensor:
    """Sum an objective over groups of rows of ``hidden`` without materialising all their logits.

    Args:
        hidden: Student hidden states ``(N, H)``.
        weight: Student LM head weight ``(V, H)``.
        bias: Student LM head bias ``(V,)`` or None.
        groups: Row selections of ``hidden`` (slices, or index tensors of disjoint rows), one chunk each.
        fn: ``fn(logits (n, V), i, need_grad) -> (value, grad)``: the objective summed over chunk ``i``'s rows
            and, when ``need_grad``, its float32 gradient w.r.t. ``logits`` (see ``per_token_and_grad``).
        scale: Multiplies the sum (``1 / N`` for a mean).

    Returns:
        Scalar float32 ``scale · Σ_i fn(...)`` with gradients for ``hidden``, ``weight`` and ``bias``.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _FusedHeadLoss.apply(hidden, weight, bias, groups, fn, scale)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for i, group in enumerate(groups):
            total += fn(_chunk_logits(hidden[group], weight, bias), i, False)[0].float() * scale
    return total


def chunked_token_loss(
    loss: TokenDivergence | TopKKL,
    hidden: Tensor,
    head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    *,
    head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk_indices: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_log_tail: Tensor | None = None,
    mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """A token-level objective computed chunk by chunk from the student's hidden states and LM head.

    The teacher side is one of: its hidden states and head (logits computed per chunk, without gradient),
    precomputed logits (sliced per chunk, e.g. a memory-mapped cache), or top-k entries (for :class:`TopKKL`).
    Equal to ``loss(student_logits, teacher_logits, mask, teacher_mask)`` on the full logits, value and
    gradients, up to float rounding.

    Args:
        loss: The objective (its temperature, options and ``"mean"``/``"sum"`` reduction apply).
        hidden: Student final hidden states, ``(N, H)`` already selected, or ``(B, T, H)`` with ``mask``.
        head_weight: Student LM head ``(V, H)``.
        teacher_hidden: Teacher final hidden states ``(N, H')`` or ``(B, T', H')``.
        teacher_head_weight: Teacher LM head ``(V, H')``.
        head_bias: Student head bias ``(V,)``.
        teacher_head_bias: Teacher head bias ``(V,)``.
        teacher_logits: Instead of the teacher's hidden states: ``(N, V)`` or ``(B, T', V)``.
        teacher_topk_indices: Instead, for ``TopKKL``: ``(N, K)`` or ``(B, T', K)`` vocabulary ids.
        teacher_topk_logprobs: With the indices: the teacher's log-probabilities at them, same shape.
        teacher_topk_log_tail: Optionally with them: the log of the teacher's mass outside the top-k, ``(N,)`` or
            ``(B, T')`` (see :meth:`TopKKL.per_token`).
        mask: ``(B, T)`` bool, required when ``hidden`` is 3-D.
        teacher_mask: ``(B, T')`` bool, the teacher's positions of the same tokens (default: ``mask``).
        chunk_size: Tokens per chunk; default :func:`default_chunk_size` of the vocabulary.

    Returns:
        Scalar float32.
    """
    sources = [teacher_hidden is not None, teacher_logits is not None, teacher_topk_indices is not None]
    if sum(sources) != 1:
        raise ValueError("give exactly one teacher side: teacher_hidden (+ head), teacher_logits or teacher_topk_*")
    if teacher_hidden is not None and teacher_head_weight is None:
        raise ValueError("teacher_hidden needs teacher_head_weight")
    if (teacher_topk_indices is None) != (teacher_topk_logprobs is None):
        raise ValueError("teacher_topk_indices and teacher_topk_logprobs must be given together")
    if teacher_topk_indices is not None and not isinstance(loss, TopKKL):
        raise ValueError(f"teacher top-k entries need a TopKKL loss, got {type(loss).__name__}")
    if teacher_topk_indices is None and isinstance(loss, TopKKL):
        raise ValueError("TopKKL needs teacher_topk_indices and teacher_topk_logprobs")
    if teacher_topk_log_tail is not None and teacher_topk_indices is None:
        raise ValueError("teacher_topk_log_tail goes with teacher_topk_indices and teacher_topk_logprobs")
    if loss.reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_token_loss supports reduction 'mean' or 'sum', got {loss.reduction!r}")
    candidates = (teacher_hidden, teacher_logits, teacher_topk_indices, teacher_topk_logprobs, teacher_topk_log_tail)
    teacher = [t for t in candidates if t is not None]

    if hidden.dim() == 3:
        if mask is None:
            raise ValueError("hidden is (B, T, H): pass mask (B, T) selecting the positions to distill")
        mask, teacher_mask = token_masks(tuple(hidden.shape), tuple(teacher[0].shape), mask, teacher_mask)
        hidden = hidden[mask]
        teacher = [t[teacher_mask] for t in teacher]
    elif hidden.dim() != 2:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}: expected (N, H) or (B, T, H)")
    n = hidden.shape[0]
    for t in teacher:
        if t.shape[0] != n:
            raise ValueError(f"student has {n} selected tokens but the teacher side has {t.shape[0]}")
    teacher = [t.detach() for t in teacher]

    vocab = head_weight.shape[0]
    size = chunk_size or default_chunk_size(vocab)
    groups = row_slices(n, size)
    scale = 1.0 / n if loss.reduction == "mean" and n > 0 else 1.0

    if teacher_hidden is not None:
        teacher_weight = teacher_head_weight.detach()
        teacher_bias = None if teacher_head_bias is None else teacher_head_bias.detach()
        if teacher_weight.shape[0] != vocab:
            raise ValueError(f"teacher head has {teacher_weight.shape[0]} vocabulary rows, student head {vocab}")

        def teacher_side(i: int) -> tuple[Tensor, ...]:
            with torch.no_grad():
                return (_chunk_logits(teacher[0][groups[i]], teacher_weight, teacher_bias),)

    else:

        def teacher_side(i: int) -> tuple[Tensor, ...]:
            return tuple(t[groups[i]] for t in teacher)

    def fn(logits: Tensor, i: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        side = teacher_side(i)
        if not need_grad:
            return loss.per_token(logits, *side).sum(), None
        if isinstance(loss, TopKKL):
            values, grad = loss.per_token_and_grad(logits, *side)
        else:
            if teacher_hidden is None:  # a slice of the caller's teacher logits: copy it before handing it over
                side = (side[0].to(torch.float32, copy=True),)
            # The chunk's logits are ours (and the teacher's copy): let the loss overwrite them.
            values, grad = loss.per_token_and_grad(logits, *side, owned=True)
        return values.sum(), grad

    return fused_head_loss(hidden, head_weight, head_bias, groups, fn, scale)
