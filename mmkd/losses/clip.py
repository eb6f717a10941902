"""Contrastive distillation of CLIP students (CLIP-KD, Yang et al., CVPR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.losses._common import kl_from_logprobs, safe_log_softmax


class CLIPDistill(nn.Module):
    """Weighted sum of in-batch similarity distillation, embedding distillation and the student's CLIP loss.

    With L2-normalised embeddings and ``s_ij = scale · <img_i, txt_j>`` on each side:

    * ``kd``: ``½ [KL(softmax_j s^T_ij ‖ softmax_j s^S_ij) + KL(softmax_i s^T_ij ‖ softmax_i s^S_ij)]``,
      the image→text and text→image distributions in the batch, mean over the batch (CLIP-KD's ICL/CRD
      family). ``scale`` is each model's own logit scale, or ``1 / temperature`` for both when given.
    * ``embedding``: ``1 − cos`` (or MSE) between the student's projected normalised embeddings and the
      teacher's, images and texts averaged (CLIP-KD's feature distillation). Linear projectors are created
      when the widths differ; they are trainable parts of the student side.
    * ``contrastive``: the student's symmetric InfoNCE loss with its own logit scale (open_clip's ClipLoss,
      single process: negatives are the local batch).

    Args:
        kd_weight: Weight of the similarity distillation.
        embedding_weight: Weight of the embedding distillation (0 disables it).
        contrastive_weight: Weight of the student's own contrastive loss.
        temperature: Fixed temperature for both sides' similarities in ``kd``; None uses each logit scale.
        student_dim: Student embedding width (needed for ``embedding`` when it differs from ``teacher_dim``).
        teacher_dim: Teacher embedding width.
        embedding_kind: ``"cosine"`` or ``"mse"``.
    """

    def __init__(
        self,
        kd_weight: float = 1.0,
        embedding_weight: float = 0.0,
        contrastive_weight: float = 1.0,
        temperature: float | None = None,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        embedding_kind: str = "cosine",
    ) -> None:
        super().__init__()
        if embedding_kind not in ("cosine", "mse"):
            raise ValueError(f"embedding_kind={embedding_kind!r}: expected 'cosine' or 'mse'")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature={temperature}: expected a positive number or None")
        self.kd_weight, self.embedding_weight, self.contrastive_weight = kd_weight, embedding_weight, contrastive_weight
        self.temperature = temperature
        self.embedding_kind = embedding_kind
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.image_projector: nn.Module = nn.Linear(student_dim, teacher_dim)
            self.text_projector: nn.Module = nn.Linear(student_dim, teacher_dim)
        else:
            self.image_projector = nn.Identity()
            self.text_projector = nn.Identity()

    def _similarities(self, image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        factor = 1.0 / self.temperature if self.temperature is not None else scale.float()
        return factor * image @ text.t()

    def _embedding_term(self, student: Tensor, teacher: Tensor, projector: nn.Module) -> Tensor:
        if isinstance(projector, nn.Linear):
            student = projector(student.to(projector.weight.dtype))
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"embedding widths differ ({student.shape[-1]} vs {teacher.shape[-1]}): "
                "pass student_dim and teacher_dim so CLIPDistill creates projectors"
            )
        student, teacher = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
        if self.embedding_kind == "mse":
            return (student - teacher).pow(2).sum(-1).mean()
        return (1.0 - (student * teacher).sum(-1)).mean()

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        teacher_image_embeds: Tensor,
        teacher_text_embeds: Tensor,
        teacher_logit_scale: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss and its detached terms.

        Args:
            image_embeds: Student image embeddings ``(B, D)`` (not normalised).
            text_embeds: Student text embeddings ``(B, D)``; row i pairs with image i.
            logit_scale: Student's exponentiated logit scale (scalar).
            teacher_image_embeds: ``(B, D')``.
            teacher_text_embeds: ``(B, D')``.
            teacher_logit_scale: Scalar.

        Returns:
            Scalar float32 loss and ``{"kd", "embedding", "contrastive"}`` (detached, unweighted).
        """
        b = image_embeds.shape[0]
        for name, t in (("text_embeds", text_embeds), ("teacher_image_embeds", teacher_image_embeds),
                        ("teacher_text_embeds", teacher_text_embeds)):
            if t.shape[0] != b:
                raise ValueError(f"{name} has batch size {t.shape[0]}: expected {b} like image_embeds")
        teacher_image_embeds, teacher_text_embeds = teacher_image_embeds.detach(), teacher_text_embeds.detach()
        zero = image_embeds.new_zeros((), dtype=torch.float32)
        terms = {"kd": zero, "embedding": zero, "contrastive": zero}
        sim = self._similarities(image_embeds, text_embeds, logit_scale)
        if self.kd_weight:
            teacher_sim = self._similarities(teacher_image_embeds, teacher_text_embeds, teacher_logit_scale.detach())
            i2t = kl_from_logprobs(safe_log_softmax(teacher_sim), safe_log_softmax(sim)).mean()
            t2i = kl_from_logprobs(safe_log_softmax(teacher_sim.t()), safe_log_softmax(sim.t())).mean()
            terms["kd"] = 0.5 * (i2t + t2i)
        if self.embedding_weight:
            terms["embedding"] = 0.5 * (
                self._embedding_term(image_embeds, teacher_image_embeds, self.image_projector)
                + self._embedding_term(text_embeds, teacher_text_embeds, self.text_projector)
            )
        if self.contrastive_weight:
            own = logit_scale.float() * F.normalize(image_embeds.float(), dim=-1) @ F.normalize(
                text_embeds.float(), dim=-1
            ).t()
            labels = torch.arange(b, device=own.device)
            terms["contrastive"] = 0.5 * (F.cross_entropy(own, labels) + F.cross_entropy(own.t(), labels))
        loss = (
            self.kd_weight * terms["kd"]
            + self.embedding_weight * terms["embedding"]
            + self.contrastive_weight * terms["contrastive"]
        )
        return loss, {k: v.detach() for k, v in terms.items()}

    def extra_repr(self) -> str:
        return (
            f"kd_weight={self.kd_weight}, embedding_weight={self.embedding_weight}, "
            f"contrastive_weight={self.contrastive_weight}, temperature={self.temperature}"
        )
