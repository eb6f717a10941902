"""Hidden-state and vision-feature distillation through a learned projector."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.losses._common import check_reduction, pool_tokens, reduce, select_tokens

KINDS = ("mse", "cosine")


class FeatureDistill(nn.Module):
    """MSE or cosine distance between projected student features and teacher features (FitNets, Romero et al.).

    The student's features pass through ``projector`` (a ``Linear(student_dim, teacher_dim)`` when the widths
    differ or ``project=True``, else identity). The projector is trainable and belongs to the student side:
    the training module must register this loss as a submodule so the projector is optimised and checkpointed
    with the student (it is not needed at inference and not exported).

    Args:
        student_dim: Student feature width.
        teacher_dim: Teacher feature width.
        kind: ``"mse"`` (mean squared error over channels) or ``"cosine"`` (``1 − cos``).
        project: Force a projector even for equal widths.
        reduction: ``"mean"`` over positions, ``"sum"`` or ``"none"``.
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, kind: str = "mse", project: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
        self.kind = kind
        self.reduction = check_reduction(reduction)
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.projector: nn.Module = (
            nn.Linear(student_dim, teacher_dim) if project or student_dim != teacher_dim else nn.Identity()
        )

    def forward(
        self, features: Tensor, teacher_features: Tensor, mask: Tensor | None = None, teacher_mask: Tensor | None = None
    ) -> Tensor:
        """The distance over the selected positions.

        Args:
            features: Student features: ``(B, T, D)`` with ``mask``, ``(N_img, N, D)`` vision features, or
                ``(N, D)`` rows.
            teacher_features: The teacher's: ``(B, T', D')``, ``(N_img, N', D')`` or ``(N, D')``.
            mask: ``(B, T)`` bool positions to compare (with ``teacher_mask`` for the teacher's positions).
                Without masks, all positions are compared; for vision features with different token counts
                the longer sequence of each image is adaptive-average-pooled to the shorter length.
            teacher_mask: ``(B, T')`` bool, or None when ``mask`` selects both sides.

        Returns:
            Scalar float32 (``(N,)`` with ``reduction="none"``).
        """
        if features.shape[-1] != self.student_dim or teacher_features.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"feature widths {features.shape[-1]} (student) / {teacher_features.shape[-1]} (teacher): "
                f"expected {self.student_dim} / {self.teacher_dim}"
            )
        teacher_features = teacher_features.detach()
        if mask is not None:
            features, teacher_features = select_tokens(features, teacher_features, mask, teacher_mask)
        elif features.shape[:-1] != teacher_features.shape[:-1]:
            if features.dim() != 3 or teacher_features.dim() != 3 or features.shape[0] != teacher_features.shape[0]:
                raise ValueError(
                    f"student features {tuple(features.shape)} and teacher features {tuple(teacher_features.shape)}"
                    " do not pair up: pass masks, or (N_img, N, D) vision features with the same N_img"
                )
            n = min(features.shape[1], teacher_features.shape[1])
            features = pool_tokens(features.transpose(0, 1).flatten(1), n).unflatten(1, (-1, self.student_dim))
            features = features.transpose(0, 1)
            teacher_features = pool_tokens(teacher_features.transpose(0, 1).flatten(1), n)
            teacher_features = teacher_features.unflatten(1, (-1, self.teacher_dim)).transpose(0, 1)
        if isinstance(self.projector, nn.Linear):
            features = features.to(self.projector.weight.dtype)
        projected = self.projector(features).float().flatten(0, -2)
        target = teacher_features.float().flatten(0, -2)
        if self.kind == "mse":
            values = (projected - target).pow(2).mean(-1)
        else:
            values = 1.0 - F.cosine_similarity(projected, target, dim=-1, eps=1e-8)
        return reduce(values, self.reduction)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"
