"""CLIPDistillModule: contrastive distillation of a CLIP student from a CLIP teacher (CLIP-KD)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmkd.modules.distill import DistillModule

__all__ = ["CLIPDistillModule"]


class CLIPDistillModule(DistillModule):
    """A CLIP student trained on :class:`mmkd.losses.CLIPDistill` against a frozen CLIP teacher.

    Objectives: ``clip_kd`` with ``objective_args.clip_kd`` the arguments of ``CLIPDistill`` (``kd_weight``,
    ``embedding_weight``, ``contrastive_weight``, ``temperature``, ``embedding_kind``). Embedding widths are
    read from the models, so the projector for differing widths is created and trained with the student.
    """

    def build_objectives(self, objective_args: Mapping[str, Mapping[str, Any]]) -> nn.ModuleDict:
        from mmkd.losses import CLIPDistill

        if set(self.weights) != {"clip_kd"}:
            raise ValueError(f"a clip stage takes the objective clip_kd, got {sorted(self.weights)}")
        args = dict(objective_args.get("clip_kd", {}))
        if self.teacher is not None:
            args.setdefault("student_dim", _embed_dim(self.student))
            args.setdefault("teacher_dim", _embed_dim(self.teacher))
        return nn.ModuleDict({"clip_kd": CLIPDistill(**args)})

    def _batch_size(self, batch: Mapping[str, Any]) -> int | None:
        images = batch.get("images")
        return int(images.shape[0]) if images is not None else 0

    def compute_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = self.student(batch["images"], batch["text"])
        with torch.no_grad():
            t = self.teacher(batch.get("teacher_images", batch["images"]), batch.get("teacher_text", batch["text"]))
        loss, terms = self.objectives["clip_kd"](out.image_embeds, out.text_embeds, out.logit_scale,
                                                 t.image_embeds, t.text_embeds, t.logit_scale)
        # clip_kd is the weighted objective; its unweighted parts are logged beside it under their own names
        parts = {"clip_similarity": terms["kd"], "clip_embedding": terms["embedding"],
                 "clip_contrastive": terms["contrastive"]}
        return {"clip_kd": loss, **parts, "loss": self.weights["clip_kd"] * loss}


def _embed_dim(model: nn.Module) -> int:
    inner = getattr(model, "model", model)
    for attr in ("embed_dim", "output_dim"):
        value = getattr(getattr(inner, "visual", None), attr, None)
        if isinstance(value, int):
            return value
    proj = getattr(inner, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    raise ValueError(f"cannot tell the embedding width of {type(model).__name__}")
