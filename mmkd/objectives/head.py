"""One pass over the student's LM head for every token objective of a stage that reads the same answer positions.

A distillation stage usually weighs an LM loss and a divergence to the teacher on the same answer tokens (DFT:
``lm + kl``, ``lm + topk_kl``). Computed one by one, each of them multiplies the answer rows' hidden states with
the ``(V, H)`` head, takes its gradient back through it and accumulates a ``(V, H)`` weight gradient: at a
vocabulary of 151,936 that is most of a small student's step, paid once per objective. Here the logits of each
chunk of rows are computed once, every objective takes its value and its gradient w.r.t. those logits, and the
recipe-weighted sum of the gradients goes back through the head once (:func:`mmkd.losses.fused_head_loss`).

Each objective keeps its own term for the logs and the stage's weighted sum (detached values), and one gradient
carrier (:data:`mmkd.contract.HEAD_GRADIENT`, value 0) holds the gradient of the weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.contract import ModelOutput
from mmkd.losses._common import row_slices
from mmkd.losses.chunked import fused_head_loss

__all__ = ["HeadTerm", "cross_entropy_and_grad", "fused_head_terms"]

# (student logits of a chunk (n, V) float32, the chunk's rows, need the gradient) -> (value summed over the rows,
# its gradient w.r.t. the logits (n, V) float32, or None).
RowsObjective = Callable[[Tensor, slice, bool], tuple[Tensor, Tensor | None]]


@dataclass
class HeadTerm:
    """An objective's part in a fused head pass.

    Attributes:
        mask: ``(B, T)`` bool, the student positions it reads (answer positions), in row-major order.
        fn: Its value and gradient on a chunk of those rows (may overwrite the logits it is given).
        scale: Multiplies its summed value (``1 / rows`` for a mean).
        chunk_size: Rows per chunk it asks for.
    """

    mask: Tensor
    fn: RowsObjective
    scale: float
    chunk_size: int


def cross_entropy_and_grad(logits: Tensor, targets: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Summed cross-entropy of rows and its gradient ``softmax - onehot`` (the LM loss of a chunk)."""
    if not need_grad:
        return F.cross_entropy(logits.float(), targets, reduction="sum"), None
    with torch.enable_grad():
        leaf = logits.detach().float().requires_grad_()
        value = F.cross_entropy(leaf, targets, reduction="sum")
        (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def fused_head_terms(student: ModelOutput, terms: Mapping[str, HeadTerm],
                     weights: Mapping[str, float]) -> tuple[dict[str, Tensor], Tensor]:
    """Every term's value and one gradient carrier for their weighted sum, from one pass over the head.

    Args:
        student: The student's output (hidden states and head).
        terms: By objective name; every mask must select the same positions.
        weights: The recipe weights of the terms.

    Returns:
        ``(values, carrier)``: each term's detached scalar value, and a scalar whose value is 0 and whose gradient is
        that of ``Σ weights[name] · value[name]`` w.r.t. the student's hidden states and head.
    """
    names = list(terms)
    mask = terms[names[0]].mask
    for name in names[1:]:
        if not torch.equal(terms[name].mask, mask):
            raise ValueError(f"fused head pass: {name} reads other positions than {names[0]}")
    hidden = student.last_hidden[mask]
    groups = row_slices(hidden.shape[0], min(t.chunk_size for t in terms.values()))
    values = {name: torch.zeros((), dtype=torch.float32, device=hidden.device) for name in names}

    def fn(logits: Tensor, i: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        rows = groups[i]
        total: Tensor | None = None
        grad: Tensor | None = None
        for j, name in enumerate(names):
            term = terms[name]
            own = logits if j == len(names) - 1 else logits.clone()  # the last one may overwrite them
            value, g = term.fn(own, rows, need_grad)
            values[name] += value.detach().float() * term.scale
            w = float(weights[name]) * term.scale
            total = value.float() * w if total is None else total + value.float() * w
            if g is not None:
                grad = g.mul_(w) if grad is None else grad.add_(g, alpha=w)
        return total, grad

    weighted = fused_head_loss(hidden, student.head_weight, student.head_bias, groups, fn, 1.0)
    return values, weighted - weighted.detach()
