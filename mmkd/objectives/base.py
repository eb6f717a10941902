"""What every objective declares, and the answer-token selection the token objectives share.

An objective is an ``nn.Module`` whose ``__init__`` signature is its schema: a recipe's ``objective_args`` are bound
to it when the recipe loads (a typo ends the command before any stage runs). What an objective reads and needs is
declared on the class, so no other layer special-cases objective names:

* ``reads``: the family of inputs its ``forward`` takes. ``"tokens"``: the student's and teacher's
  :class:`~mmkd.contract.ModelOutput` and the :class:`~mmkd.contract.DistillBatch`; ``"preference"``: sequence
  log-probabilities of chosen and rejected answers; ``"clip"``: :class:`~mmkd.contract.CLIPOutput` s. A task
  declares which families it computes.
* ``needs_teacher`` and ``needs_hidden_states``: what the forward passes must provide.
* ``reads_cache``: the objective can take the teacher from a teacher cache instead (the batch's
  :class:`~mmkd.contract.TeacherTopK`), so a stage with ``task_args.teacher_cache`` never loads the teacher.
* ``context``: constructor arguments the stage fills in, unless the recipe sets them: ``"total_steps"`` (the stage's
  optimizer steps), ``"student.hidden_size"``, ``"teacher.embed_dim"``, ... (an attribute of a model).

Answer tokens follow the Hugging Face shift: the hidden state at position ``t - 1`` predicts ``labels[t]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Objective", "answer_positions", "answer_targets", "check_counts"]


class Objective(nn.Module):
    """Base class of every objective (see the module docstring for the declarations)."""

    reads: ClassVar[str] = "tokens"
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    reads_cache: ClassVar[bool] = False
    context: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:  # an objective without arguments takes none (not nn.Module's *args, **kwargs)
        super().__init__()

    def forward(self, *args: Any) -> Tensor:
        raise NotImplementedError

    def extras(self) -> dict[str, Tensor]:
        """Values the last forward computed besides the term (logged as ``<name>_<key>``, averaged over the global
        batch, and handed back to :meth:`on_optimizer_step`); read once."""
        return {}

    def on_optimizer_step(self, value: Tensor, extras: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """Called once per optimizer step with this objective's mean over the global batch (same on every rank)
        and the global means of its :meth:`extras`.

        Returns:
            Values to log under ``train/<name>_<key>`` (e.g. TAID's interpolation ``t``).
        """
        return {}


def answer_positions(labels: Tensor) -> Tensor:
    """``(B, T)`` bool: positions whose hidden state predicts an answer token (``labels[t+1] != -100``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def answer_targets(labels: Tensor) -> Tensor:
    """The answer token ids in the order of :func:`answer_positions`, ``(N,)``."""
    return labels[:, 1:][labels[:, 1:] != -100]


def check_counts(s_mask: Tensor, t_mask: Tensor) -> None:
    """Both sides select the same number of answer tokens in every sample (else a one-line error)."""
    s_count, t_count = s_mask.sum(1), t_mask.sum(1)
    bad = (s_count != t_count).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"sample {i} of the batch has {int(s_count[i])} student answer tokens but {int(t_count[i])} teacher "
            "answer tokens: teacher and student must select the same answer tokens"
        )
