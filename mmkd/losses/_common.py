"""Shared helpers of the objectives: token selection, safe float32 log-softmax, visual-token grouping, pooling,
and the all-gather of batch rows across ranks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# Log-probabilities of -inf (masked vocabulary entries) are floored to this finite value. A floor keeps
# `p * (log p - log q)` at exactly 0 where p == 0 and keeps every gradient finite (clamp passes no gradient
# below its minimum), where raw -inf would give 0 * inf = NaN in the forward or the backward pass.
LOG_FLOOR = -1e30

REDUCTIONS = ("mean", "sum", "none")


def safe_log_softmax(logits: Tensor) -> Tensor:
    """Float32 log-softmax over the last dim with -inf entries floored to ``LOG_FLOOR``.

    The floor is applied only when an entry is below it, in place when no gradient flows through the result,
    so the common case costs no extra ``(N, V)`` tensor.

    Args:
        logits: ``(..., V)``, any float dtype; ``-inf`` allowed for masked vocabulary entries.

    Returns:
        ``(..., V)`` float32 log-probabilities.
    """
    out = F.log_softmax(logits.float(), dim=-1)
    if out.numel() and bool(out.detach().amin() < LOG_FLOOR):
        out = out.clamp(min=LOG_FLOOR) if out.requires_grad else out.clamp_(min=LOG_FLOOR)
    return out


def row_slices(rows: int, step: int) -> list[slice]:
    """Consecutive slices of ``rows`` rows, ``step`` rows each (the last may be shorter)."""
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product ``(N, V), (N, V) -> (N,)`` through a batched matmul (no ``(N, V)`` temporary)."""
    return torch.bmm(x.unsqueeze(-2), y.unsqueeze(-1)).flatten()


def kl_from_logprobs(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) per row from log-probabilities, ``(..., V) -> (...)``."""
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_to_constant(teacher_logp: Tensor, logp: Tensor) -> Tensor:
    """KL(p_T‖p) per row for a constant ``p_T``, ``(N, V), (N, V) -> (N,)``.

    Written as ``p_T·log p_T − p_T·log p`` with row dot products so that autograd keeps only ``p_T`` and
    the log-softmax output: this is what lets a full-vocabulary forward KL fit in memory.
    """
    p = teacher_logp.exp()
    return rowdot(p, teacher_logp) - rowdot(p, logp)


def log_mixture(logp: Tensor, logq: Tensor, weight: float) -> Tensor:
    """``log(weight·p + (1−weight)·q)`` computed stably, for ``0 < weight < 1``."""
    return torch.logaddexp(logp + math.log(weight), logq + math.log1p(-weight))


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    return reduction


def reduce(values: Tensor, reduction: str) -> Tensor:
    """Reduce per-token values ``(N,)``; the mean of no tokens is 0 (still attached to the graph)."""
    if reduction == "none":
        return values
    if reduction == "sum" or values.numel() == 0:
        return values.sum()
    return values.mean()


def _as_bool_mask(mask: Tensor, name: str, shape: tuple[int, ...]) -> Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}: expected {tuple(shape)} (batch, positions)")
    return mask if mask.dtype == torch.bool else mask.bool()


def token_masks(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    mask: Tensor,
    teacher_mask: Tensor | None,
    what: str = "answer tokens",
) -> tuple[Tensor, Tensor]:
    """Validate the student and teacher position masks and check that they select the same tokens per sample.

    Args:
        student_shape: ``(B, T, ...)`` of the student tensor.
        teacher_shape: ``(B, T', ...)`` of the teacher tensor.
        mask: ``(B, T)`` bool, the student's selected positions.
        teacher_mask: ``(B, T')`` bool or None; None means ``mask`` selects both sides (then ``T' == T``).
        what: What the masks select, for error messages.

    Returns:
        The student and teacher masks as bool tensors.

    Raises:
        ValueError: On a shape mismatch, or when a sample selects a different number of tokens on each side.
    """
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(f"student batch size {student_shape[0]} != teacher batch size {teacher_shape[0]}")
    mask = _as_bool_mask(mask, "mask", student_shape[:2])
    if teacher_mask is None:
        if student_shape[1] != teacher_shape[1]:
            raise ValueError(
                f"teacher has {teacher_shape[1]} positions but student has {student_shape[1]}: "
                "pass teacher_mask to select the teacher's positions of the same tokens"
            )
        return mask, mask
    teacher_mask = _as_bool_mask(teacher_mask, "teacher_mask", teacher_shape[:2])
    counts, teacher_counts = mask.sum(1), teacher_mask.sum(1)
    bad = (counts != teacher_counts).nonzero().flatten()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(
            f"sample {b}: mask selects {int(counts[b])} {what} but teacher_mask selects {int(teacher_counts[b])}; "
            "both must select the same tokens"
        )
    return mask, teacher_mask


def select_tokens(
    student: Tensor, teacher: Tensor, mask: Tensor, teacher_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gather the selected positions of both sides into aligned flat rows.

    Args:
        student: ``(B, T, D)``.
        teacher: ``(B, T', D')``.
        mask: ``(B, T)`` bool.
        teacher_mask: ``(B, T')`` bool or None (then ``mask`` selects both).

    Returns:
        ``(N, D)`` and ``(N, D')``: row i of each is the same token (row-major order within each sample).
    """
    mask, teacher_mask = token_masks(tuple(student.shape), tuple(teacher.shape), mask, teacher_mask)
    return student[mask], teacher[teacher_mask]


def visual_groups(
    visual_mask: Tensor,
    teacher_visual_mask: Tensor,
    tokens_per_image: int | None,
    teacher_tokens_per_image: int | None,
    split_runs: bool = False,
) -> list[tuple[int, Tensor, Tensor]]:
    """Pair each image's (or, without token counts, each sample's) visual positions on the two sides.

    Args:
        visual_mask: ``(B, T)`` bool, the student's visual-token positions.
        teacher_visual_mask: ``(B, T')`` bool.
        tokens_per_image: Student visual tokens per image (``vision_features.shape[1]``), or None when
            unknown or different per image.
        teacher_tokens_per_image: Teacher visual tokens per image, or None.
        split_runs: Pair images even without a count on either side: each side's images are its runs of
            consecutive visual positions (needed to find each image's base grid).

    Returns:
        One ``(sample, student_positions (n,), teacher_positions (n',))`` per image; samples without images
        give nothing. Without per-image token counts on either side each sample's visual positions form one
        group; with a count on one side only, the other side's images are its runs of consecutive positions.

    Raises:
        ValueError: When a sample has visual tokens on one side only, or a different number of images per side.
    """
    groups: list[tuple[int, Tensor, Tensor]] = []
    for b in range(visual_mask.shape[0]):
        pos = visual_mask[b].nonzero().flatten()
        teacher_pos = teacher_visual_mask[b].nonzero().flatten()
        n, nt = pos.numel(), teacher_pos.numel()
        if n == 0 and nt == 0:
            continue
        if n == 0 or nt == 0:
            raise ValueError(f"sample {b}: student has {n} visual tokens but teacher has {nt}; both need the image")
        if tokens_per_image is None and teacher_tokens_per_image is None and not split_runs:
            groups.append((b, pos, teacher_pos))
            continue
        images = _split_images(pos, tokens_per_image, b, "student")
        teacher_images = _split_images(teacher_pos, teacher_tokens_per_image, b, "teacher")
        if len(images) != len(teacher_images):
            raise ValueError(f"sample {b}: student sees {len(images)} images but teacher sees {len(teacher_images)}")
        groups.extend(zip([b] * len(images), images, teacher_images))
    return groups


def _split_images(pos: Tensor, per_image: int | None, sample: int, side: str) -> list[Tensor]:
    """One sample's visual positions split per image: in blocks of ``per_image``, or, when a side's count varies
    per image (any-resolution tiling), into runs of consecutive positions (images separated by text)."""
    if per_image is None:
        breaks = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten() + 1
        return list(pos.tensor_split(breaks.tolist()))
    if pos.numel() % per_image:
        raise ValueError(f"sample {sample}: {pos.numel()} {side} visual tokens are not whole images of {per_image}")
    return list(pos.split(per_image))


def pool_tokens(x: Tensor, length: int) -> Tensor:
    """Adaptive average pooling along the token axis, ``(n, D) -> (length, D)``; identity when ``n == length``.

    When each side's count is a whole number of equal images, pooling a sample's concatenated images gives the
    same windows as pooling each image: window edges at image boundaries fall on integers.
    """
    if x.shape[0] == length:
        return x
    return F.adaptive_avg_pool1d(x.t().unsqueeze(0), length).squeeze(0).t()


def square_side(n: int) -> int | None:
    """``g`` when ``n == g * g``, else None."""
    g = math.isqrt(n)
    return g if g * g == n else None


def pool_grid(x: Tensor, side: int) -> Tensor:
    """Adaptive average pooling of a square token grid, ``(g·g, D) -> (side·side, D)``, both in row-major order.

    The tokens of an image's grid are rows of a ``g x g`` map: pooling the map keeps spatial neighbours together,
    where 1-D pooling of the flattened sequence would average the ends of one row with the start of the next.
    """
    g = square_side(x.shape[0])
    if g is None:
        raise ValueError(f"pool_grid: {x.shape[0]} tokens are not a square grid")
    if g == side:
        return x
    width = x.shape[1]
    pooled = F.adaptive_avg_pool2d(x.t().reshape(1, width, g, g), side)
    return pooled.reshape(width, side * side).t()


def pool_pair(student: Tensor, teacher: Tensor, grid: bool = False) -> tuple[Tensor, Tensor]:
    """Pool the longer of two ``(n, D)`` token sequences to the shorter one's length.

    Args:
        student: ``(n, D)``.
        teacher: ``(n', D')``.
        grid: The sequences are square grids in row-major order (an image's base grid): when the counts differ and
            both are perfect squares, pool the longer on the 2-D grid (:func:`pool_grid`); otherwise, and always
            without ``grid``, adaptive 1-D pooling along the sequence.

    Returns:
        ``(m, D)`` and ``(m, D')``, the same ``m``.
    """
    n, nt = student.shape[0], teacher.shape[0]
    if grid and n != nt:
        side, teacher_side = square_side(n), square_side(nt)
        if side is not None and teacher_side is not None:
            m = min(side, teacher_side)
            return pool_grid(student, m), pool_grid(teacher, m)
    m = min(n, nt)
    return pool_tokens(student, m), pool_tokens(teacher, m)


def gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate every rank's rows of each tensor, in rank order; this rank's own rows keep their gradient.

    As open_clip's ``gather_features`` (``gather_with_grad=False``, ``local_loss=False``): the other ranks' rows
    arrive without gradient and this rank's slice is replaced by the local tensor, so a loss over the global batch
    back-propagates into the local rows only. Ranks may hold different numbers of rows (a last or stand-in batch):
    the counts are exchanged first and the rows padded for the collective. Every rank must call this with the same
    number of tensors, in the same order. A no-op (the same tensors) without an initialised process group or with
    one process.

    Args:
        *tensors: ``(n, ...)`` each, the same ``n`` on this rank, any dtype.

    Returns:
        ``(N, ...)`` each, ``N`` the sum of every rank's ``n``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world, rank = dist.get_world_size(), dist.get_rank()
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"gather_rows: tensors have {[t.shape[0] for t in tensors]} rows; expected one count")
    count = torch.tensor([n], dtype=torch.long, device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    top = max(sizes)
    out = []
    for t in tensors:
        local = t.detach().contiguous()
        if n < top:  # all_gather needs one shape on every rank
            local = torch.cat([local, local.new_zeros((top - n, *local.shape[1:]))])
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        parts = [p[:size] for p, size in zip(parts, sizes)]
        parts[rank] = t
        out.append(torch.cat(parts))
    return tuple(out)
