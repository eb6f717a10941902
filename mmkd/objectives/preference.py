"""The preference objective: DPO over the sequence log-probabilities of chosen and rejected answers."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mmkd.contract import ModelOutput
from mmkd.losses import DPODistill
from mmkd.objectives.base import Objective, answer_positions, answer_targets

__all__ = ["DPOObjective", "answer_logprobs"]


def answer_logprobs(output: ModelOutput, labels: Tensor, average: bool = False) -> Tensor:
    """Per-sequence log-probability of the answer tokens, computing logits only at answer positions.

    Equal to ``mmkd.losses.sequence_logprobs(output.logits(), labels)`` without the ``(B, T, V)`` logits.

    Args:
        output: A model's output.
        labels: ``(B, T)``, -100 outside the answer.
        average: Mean over answer tokens instead of the sum.

    Returns:
        ``(B,)`` float32.
    """
    positions = answer_positions(labels)
    rows = positions.nonzero(as_tuple=True)[0]
    logits = output.logits(output.last_hidden[positions]).float()
    token_logp = logits.gather(-1, answer_targets(labels)[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logp)
    if average:
        total = total / positions.sum(1).clamp(min=1)
    return total


class DPOObjective(Objective):
    """``dpo``: direct preference optimisation against a frozen reference (LLaVA-MoD's preference distillation).

    Which model is the reference, and whether log-probabilities are length-averaged, is the preference task's
    choice (``task_args``); this objective is the loss over the four log-probabilities.

    Args:
        beta: Strength of the implicit KL regulariser.
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` or ``kto_pair`` (LLaVA-MoD's default; TRL 0.7's forms).
        label_smoothing: Conservative DPO's ε, sigmoid loss only.
    """

    reads = "preference"
    needs_teacher = False  # the reference comes from the task

    def __init__(self, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo", "hinge", "kto_pair"] = "sigmoid",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.loss = DPODistill(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)

    @property
    def loss_type(self) -> str:
        return self.loss.loss_type

    def forward(self, policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                reference_rejected: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch-mean loss and its metrics (rewards, margin, accuracy); ``(B,)`` log-probs each."""
        return self.loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
