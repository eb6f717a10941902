"""Distillation (DPT, SFT, DFT): a weighted sum of token objectives on labelled image-text sequences."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmkd.contract import AUX_LOSS, DistillBatch
from mmkd.objectives import Objective
from mmkd.tasks.base import Collator, ObjectiveTask

__all__ = ["DistillTask"]


class DistillTask(ObjectiveTask):
    """The student's (and, for distillation objectives, the frozen teacher's) forward pass over the dataset's
    sequences, and every objective on their outputs.

    With only teacher-free objectives (``lm``) this is supervised fine-tuning and the teacher is not loaded.

    Args:
        objectives: The stage's token objectives by recipe name.
        on_overflow: A sample longer than the stage's ``max_length``: ``truncate`` its answer or ``skip`` it.
    """

    accepts = ("tokens",)

    def __init__(self, objectives: dict[str, Objective], on_overflow: Literal["truncate", "skip"] = "truncate"):
        super().__init__(objectives)
        self.on_overflow = on_overflow

    def collator(self, student: Any, teacher: Any | None, max_length: int) -> Collator:
        from mmkd.data.collate import MultimodalCollator

        return MultimodalCollator.for_models(student, teacher if self.needs_teacher else None, max_length=max_length,
                                             on_overflow=self.on_overflow)

    def losses(self, student: nn.Module, teacher: nn.Module | None, batch: DistillBatch) -> dict[str, Tensor]:
        hidden = any(o.needs_hidden_states for o in self.objectives.values())
        student_out = student(**batch.inputs.kwargs(), output_hidden_states=hidden)
        teacher_out = None
        if any(o.needs_teacher for o in self.objectives.values()):
            with torch.no_grad():
                teacher_out = teacher(**batch.teacher_side()[0].kwargs(), output_hidden_states=hidden)
        terms: dict[str, Tensor] = {}
        for name, objective in self.objectives.items():
            terms.update(self.objective_terms(name, objective(student_out, teacher_out, batch)))
        if student_out.aux_loss is not None:
            terms[AUX_LOSS] = student_out.aux_loss
        return terms
