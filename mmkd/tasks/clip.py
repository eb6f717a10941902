"""Contrastive distillation of CLIP students from a CLIP teacher (CLIP-KD)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmkd.contract import CLIPBatch
from mmkd.objectives import Objective
from mmkd.tasks.base import Collator, ObjectiveTask

__all__ = ["CLIPTask"]


class CLIPTask(ObjectiveTask):
    """A CLIP student's embeddings of image-caption pairs against a frozen CLIP teacher's.

    The stage names one contrastive objective (``clip_kd``); its unweighted parts are logged beside it as
    ``clip_similarity``, ``clip_embedding``, ``clip_contrastive`` and ``clip_icl``. After every optimizer step the
    student's logit scale is clamped to ``[0, ln 100]``.

    Args:
        objectives: The stage's objectives by recipe name.
    """

    accepts = ("clip",)
    requires = ("clip",)

    def __init__(self, objectives: dict[str, Objective]) -> None:
        super().__init__(objectives)
        (self.name, self.objective), = self.of_family("clip").items()

    def collator(self, student: Any, teacher: Any | None, max_length: int) -> Collator:
        from mmkd.data.clip import CLIPCollator

        return CLIPCollator.for_models(student, teacher)

    def losses(self, student: nn.Module, teacher: nn.Module | None, batch: CLIPBatch) -> dict[str, Tensor]:
        out = student(batch.images, batch.text)
        with torch.no_grad():
            images = batch.teacher_images if batch.teacher_images is not None else batch.images
            text = batch.teacher_text if batch.teacher_text is not None else batch.text
            t = teacher(images, text)
        loss, parts = self.objective(out, t)
        return {self.name: loss, "clip_similarity": parts["kd"], "clip_embedding": parts["embedding"],
                "clip_contrastive": parts["contrastive"], "clip_icl": parts["icl"]}

    def after_optimizer_step(self, student: nn.Module) -> None:
        """The student's logit scale stays in ``[0, ln 100]`` (open_clip and CLIP-KD clamp it after every step)."""
        from mmkd.losses import clamp_logit_scale_

        for scale in student.parts().get("logit_scale", []):
            clamp_logit_scale_(scale)
