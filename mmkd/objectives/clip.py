"""The contrastive objective of CLIP students: CLIP-KD's distillation terms and the student's own CLIP loss."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import Tensor

from mmkd.contract import CLIPOutput
from mmkd.losses import CLIPDistill
from mmkd.objectives.base import Objective

__all__ = ["CLIPKDObjective"]


class CLIPKDObjective(Objective):
    """``clip_kd``: the weighted sum of :class:`mmkd.losses.CLIPDistill`'s terms.

    Args:
        kd_weight: Weight of the in-batch similarity distillation.
        embedding_weight: Weight of the embedding distillation (0 disables it).
        contrastive_weight: Weight of the student's own contrastive loss.
        temperature: Fixed temperature for both sides' similarities; None uses each model's logit scale.
        student_dim: Student embedding width (filled in from the student).
        teacher_dim: Teacher embedding width (filled in from the teacher).
        embedding_kind: ``cosine``, ``mse`` or ``mse_mean`` (CLIP-KD's FD: element-mean MSE per modality, summed).
        icl_weight: Weight of CLIP-KD's interactive contrastive term (student against teacher embeddings).
        icl_exp_scale: Exponentiate the ICL term's own learnable scale (CLIP-KD uses it as it is).
        gather: Compute every term on the embeddings of all ranks (the global batch's negatives).
    """

    reads = "clip"
    context: ClassVar[dict[str, str]] = {"student_dim": "student.embed_dim", "teacher_dim": "teacher.embed_dim"}

    def __init__(self, kd_weight: float = 1.0, embedding_weight: float = 0.0, contrastive_weight: float = 1.0,
                 temperature: float | None = None, student_dim: int | None = None, teacher_dim: int | None = None,
                 embedding_kind: Literal["cosine", "mse", "mse_mean"] = "cosine", icl_weight: float = 0.0,
                 icl_exp_scale: bool = False, gather: bool = True) -> None:
        super().__init__()
        self.loss = CLIPDistill(kd_weight, embedding_weight, contrastive_weight, temperature, student_dim,
                                teacher_dim, embedding_kind, icl_weight=icl_weight, icl_exp_scale=icl_exp_scale,
                                gather=gather)

    def forward(self, student: CLIPOutput, teacher: CLIPOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss and its unweighted parts ``kd``, ``embedding``, ``contrastive``, ``icl``."""
        return self.loss(student.image_embeds, student.text_embeds, student.logit_scale, teacher.image_embeds,
                         teacher.text_embeds, teacher.logit_scale)
