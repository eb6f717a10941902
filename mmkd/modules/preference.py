"""PreferenceDistillModule: DPO preference distillation with the teacher as the reference (LLaVA-MoD)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmkd.modules.distill import DistillModule, _freeze, _split_inputs
from mmkd.modules.objectives import answer_positions

__all__ = ["PreferenceDistillModule", "answer_logprobs"]

REFERENCES = ("teacher", "initial_student")


def answer_logprobs(output: Any, labels: Tensor, average: bool = False) -> Tensor:
    """Per-sequence log-probability of the answer tokens, computing logits only at answer positions.

    Equal to ``mmkd.losses.sequence_logprobs(output.logits(), labels)`` without the ``(B, T, V)`` logits.

    Args:
        output: A :class:`~mmkd.contract.ModelOutput`.
        labels: ``(B, T)``, -100 outside the answer.
        average: Mean over answer tokens instead of the sum.

    Returns:
        ``(B,)`` float32.
    """
    positions = answer_positions(labels)
    rows = positions.nonzero(as_tuple=True)[0]
    targets = labels[:, 1:][labels[:, 1:] != -100]
    logits = output.logits(output.last_hidden[positions]).float()
    token_logp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logp)
    if average:
        total = total / positions.sum(1).clamp(min=1)
    return total


class PreferenceDistillModule(DistillModule):
    """DPO on chosen/rejected answer pairs, with the teacher (or the stage's starting student) as reference.

    Objectives: ``dpo`` (required) and optionally ``lm`` (NLL of the chosen answer, a common regulariser).
    ``objective_args.dpo``: ``beta``, ``loss_type`` (``sigmoid``/``ipo``), ``label_smoothing``, ``reference``
    (``teacher`` or ``initial_student``) and ``average`` (length-averaged log-probs; IPO expects it).

    Reference log-probabilities are computed under ``no_grad`` by a frozen model that is neither a submodule
    nor in the optimizer or the checkpoint; ``initial_student`` is a frozen copy taken when the stage is built
    (on resume the runner rebuilds the stage's starting student first, so the copy is the same).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, objectives: Mapping[str, float], **kwargs: Any):
        self._dpo_args = dict((kwargs.get("objective_args") or {}).get("dpo", {}))
        self.reference_kind = self._dpo_args.pop("reference", "teacher")
        self.average = bool(self._dpo_args.pop("average", self._dpo_args.get("loss_type") == "ipo"))
        if self.reference_kind not in REFERENCES:
            raise ValueError(f"objective_args.dpo.reference={self.reference_kind!r}: expected one of {REFERENCES}")
        if "dpo" not in objectives or set(objectives) - {"dpo", "lm"}:
            raise ValueError(f"a preference stage takes objectives dpo (and optionally lm), got {sorted(objectives)}")
        if self.reference_kind == "teacher" and teacher is None:
            raise ValueError("objective_args.dpo.reference=teacher needs a teacher; set one or use initial_student")
        # The reference sits where the teacher sits: a frozen plain attribute, out of the optimizer and checkpoints.
        reference = teacher if self.reference_kind == "teacher" else _freeze_copy(student)
        super().__init__(student, reference, objectives, **kwargs)

    def build_objectives(self, objective_args: Mapping[str, Mapping[str, Any]]) -> nn.ModuleDict:
        from mmkd.losses import DPODistill

        return nn.ModuleDict({"dpo": DPODistill(**self._dpo_args)})

    @property
    def reference(self) -> nn.Module:
        """The frozen reference model (the teacher, or a copy of the stage's starting student)."""
        return self.teacher

    @torch.no_grad()
    def reference_logprobs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The reference model's answer log-probs per side (its own inputs when the batch carries them)."""
        out = {}
        for side in ("chosen", "rejected"):
            prefix = f"teacher_{side}_" if f"teacher_{side}_input_ids" in batch else f"{side}_"
            labels = batch.get(f"teacher_{side}_labels", batch[f"{side}_labels"])
            out[side] = answer_logprobs(self.reference(**_split_inputs(batch, prefix)), labels, self.average)
        return out

    def compute_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        policy = {}
        chosen_out = None
        for side in ("chosen", "rejected"):
            out = self.student(**_split_inputs(batch, f"{side}_"))
            policy[side] = answer_logprobs(out, batch[f"{side}_labels"], self.average)
            if side == "chosen":
                chosen_out = out
        reference = self.reference_logprobs(batch)
        loss, metrics = self.objectives["dpo"](policy["chosen"], policy["rejected"], reference["chosen"],
                                               reference["rejected"])
        terms: dict[str, Tensor] = {"dpo": loss, **{f"dpo_{k}": v for k, v in metrics.items()}}
        total = self.weights["dpo"] * loss
        if "lm" in self.weights:
            labels = batch["chosen_labels"]
            terms["lm"] = -(answer_logprobs(chosen_out, labels).sum() / (labels[:, 1:] != -100).sum().clamp(min=1))
            total = total + self.weights["lm"] * terms["lm"]
        if chosen_out.aux_loss is not None:
            terms["aux"] = chosen_out.aux_loss
            total = total + chosen_out.aux_loss
        terms["loss"] = total
        return terms

    def _batch_size(self, batch: Mapping[str, Any]) -> int | None:
        ids = batch.get("chosen_input_ids")
        return int(ids.shape[0]) if ids is not None else None


def _freeze_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    if hasattr(ref, "freeze"):
        ref.freeze()
    else:
        _freeze(ref)
    return ref
