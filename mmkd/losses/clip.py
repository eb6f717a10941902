"""Contrastive distillation of CLIP students (CLIP-KD, Yang et al., CVPR 2024; official code winycg/CLIP-KD)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.losses._common import gather_rows, kl_from_logprobs, safe_log_softmax

EMBEDDING_KINDS = ("cosine", "mse", "mse_mean")

# open_clip (and CLIP-KD's training loop) clamp the learnable log logit scale to [0, ln 100] after every optimizer
# step, so the similarity scale stays in [1, 100] (temperature >= 0.01) as in CLIP.
MAX_LOG_LOGIT_SCALE = math.log(100.0)

# The initial value of every learnable logit scale in CLIP, open_clip and CLIP-KD: ln(1 / 0.07).
INIT_LOG_LOGIT_SCALE = math.log(1 / 0.07)


def clamp_logit_scale_(scale: Tensor, max_log_scale: float = MAX_LOG_LOGIT_SCALE) -> Tensor:
    """Clamp a learnable log logit scale to ``[0, max_log_scale]`` in place (open_clip's step-end clamp).

    Call it after each optimizer step on the student's ``logit_scale`` parameter (the log; the model returns its
    exponential), and on :attr:`CLIPDistill.icl_logit_scale` when that one is exponentiated too.

    Args:
        scale: A scalar parameter (or any tensor), clamped without recording a gradient.
        max_log_scale: Upper bound (default ``ln 100``).

    Returns:
        ``scale`` itself.
    """
    with torch.no_grad():
        scale.clamp_(0.0, max_log_scale)
    return scale


class CLIPDistill(nn.Module):
    """Weighted sum of CLIP-KD's terms and the student's CLIP loss, over the global batch.

    With L2-normalised embeddings and ``s_ij = scale · <img_i, txt_j>`` on each side:

    * ``kd``: ``½ [KL(softmax_j s^T_ij ‖ softmax_j s^S_ij) + KL(softmax_i s^T_ij ‖ softmax_i s^S_ij)]``,
      the image→text and text→image distributions in the batch, mean over the batch (CLIP-KD's CRD, ``ckd_loss``
      in the official code). ``scale`` is each model's own logit scale, or ``1 / temperature`` for both when given.
    * ``embedding``: distance between the student's projected normalised embeddings and the teacher's normalised
      ones (CLIP-KD's feature distillation, FD). ``embedding_kind`` picks the distance:

      - ``"cosine"``: ``1 − cos``, mean over rows, images and texts averaged;
      - ``"mse"``: squared L2 distance summed over the width, mean over rows, images and texts averaged;
      - ``"mse_mean"``: CLIP-KD's ``fd_loss`` exactly: ``F.mse_loss`` (mean over rows *and* width) of images plus
        that of texts (a sum over the two modalities), so ``embedding_weight=2000`` is the paper's weight.

      Linear projectors (student width → teacher width) are created when the widths differ; they are trainable
      parts of the student side and, as in the official code, project the raw (not normalised) embeddings.
    * ``icl``: CLIP-KD's interactive contrastive learning: InfoNCE of the student's projected image embeddings
      against the teacher's text embeddings and of the student's projected text embeddings against the teacher's
      image embeddings, ``½ [CE(c · ŝ_img t̂_txtᵀ, i) + CE(c · ŝ_txt t̂_imgᵀ, i)]``, with its own learnable scale
      ``c`` (:attr:`icl_logit_scale`, initialised to ``ln(1/0.07)``). The official code multiplies by the
      parameter itself (``icl_exp_scale=False``, initial scale ≈ 2.66) and never clamps it; ``icl_exp_scale=True``
      multiplies by its exponential, the convention of CLIP's own logit scale (initial scale ≈ 14.3).
    * ``contrastive``: the student's symmetric InfoNCE loss with its own logit scale (open_clip's ClipLoss).

    **Across ranks** (``gather=True``, a no-op in one process): the four embedding tensors are all-gathered first
    (:func:`mmkd.losses._common.gather_rows`), so every term is computed over the global batch and the negatives
    are every rank's samples, as open_clip and CLIP-KD do. Every rank computes the same global loss; the gradient
    reaches only this rank's rows of the embeddings. Since DDP averages gradients over the ``W`` ranks, the student
    encoders receive ``1/W`` of the single-process gradient of the global loss (exactly as in open_clip and
    CLIP-KD), while parameters applied after the gather (the logit scales, this module's projectors and ICL scale)
    receive the whole gradient on every rank. With ``gather=True`` every rank must call this module every step.

    Args:
        kd_weight: Weight of the similarity distillation.
        embedding_weight: Weight of the embedding distillation (0 disables it; CLIP-KD: 2000 with ``"mse_mean"``).
        contrastive_weight: Weight of the student's own contrastive loss.
        temperature: Fixed temperature for both sides' similarities in ``kd``; None uses each logit scale.
        student_dim: Student embedding width (needed for ``embedding``/``icl`` when it differs from ``teacher_dim``).
        teacher_dim: Teacher embedding width.
        embedding_kind: ``"cosine"``, ``"mse"`` or ``"mse_mean"`` (see above).
        icl_weight: Weight of the interactive contrastive term (0 disables it and creates no parameter).
        icl_scale_init: Initial value of :attr:`icl_logit_scale`.
        icl_exp_scale: Multiply the ICL similarities by ``exp(icl_logit_scale)`` instead of the parameter itself.
        gather: All-gather the embeddings across ranks before computing the terms.
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
        icl_weight: float = 0.0,
        icl_scale_init: float = INIT_LOG_LOGIT_SCALE,
        icl_exp_scale: bool = False,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if embedding_kind not in EMBEDDING_KINDS:
            raise ValueError(f"embedding_kind={embedding_kind!r}: expected one of {', '.join(EMBEDDING_KINDS)}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature={temperature}: expected a positive number or None")
        self.kd_weight, self.embedding_weight, self.contrastive_weight = kd_weight, embedding_weight, contrastive_weight
        self.icl_weight = icl_weight
        self.temperature = temperature
        self.embedding_kind = embedding_kind
        self.icl_exp_scale = icl_exp_scale
        self.gather = gather
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.image_projector: nn.Module = nn.Linear(student_dim, teacher_dim)
            self.text_projector: nn.Module = nn.Linear(student_dim, teacher_dim)
        else:
            self.image_projector = nn.Identity()
            self.text_projector = nn.Identity()
        # Only a term that is used owns a parameter: an unused one would get no gradient (DDP's unused-parameter
        # check) and would change the state dict of checkpoints written without ICL.
        scale = nn.Parameter(torch.tensor(float(icl_scale_init))) if icl_weight else None
        self.register_parameter("icl_logit_scale", scale)

    def _similarities(self, image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        factor = 1.0 / self.temperature if self.temperature is not None else scale.float()
        return factor * image @ text.t()

    @staticmethod
    def _projected(student: Tensor, teacher_width: int, projector: nn.Module) -> Tensor:
        """The student's embeddings in the teacher's width, L2-normalised, float32 ``(B, D')``."""
        if isinstance(projector, nn.Linear):
            student = projector(student.to(projector.weight.dtype))
        if student.shape[-1] != teacher_width:
            raise ValueError(
                f"embedding widths differ ({student.shape[-1]} vs {teacher_width}): "
                "pass student_dim and teacher_dim so CLIPDistill creates projectors"
            )
        return F.normalize(student.float(), dim=-1)

    def _embedding_term(self, student: Tensor, teacher: Tensor, projector: nn.Module) -> Tensor:
        student = self._projected(student, teacher.shape[-1], projector)
        teacher = F.normalize(teacher.float(), dim=-1)
        if self.embedding_kind == "mse_mean":
            return F.mse_loss(student, teacher)
        if self.embedding_kind == "mse":
            return (student - teacher).pow(2).sum(-1).mean()
        return (1.0 - (student * teacher).sum(-1)).mean()

    def _icl_term(self, image: Tensor, text: Tensor, teacher_image: Tensor, teacher_text: Tensor) -> Tensor:
        student_image = self._projected(image, teacher_image.shape[-1], self.image_projector)
        student_text = self._projected(text, teacher_text.shape[-1], self.text_projector)
        teacher_image = F.normalize(teacher_image.float(), dim=-1)
        teacher_text = F.normalize(teacher_text.float(), dim=-1)
        scale = self.icl_logit_scale.float()
        if self.icl_exp_scale:
            scale = scale.exp()
        labels = torch.arange(image.shape[0], device=student_image.device)
        return 0.5 * (F.cross_entropy(scale * student_image @ teacher_text.t(), labels)
                      + F.cross_entropy(scale * student_text @ teacher_image.t(), labels))

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
            image_embeds: Student image embeddings ``(B, D)`` (not normalised), this rank's.
            text_embeds: Student text embeddings ``(B, D)``; row i pairs with image i.
            logit_scale: Student's exponentiated logit scale (scalar).
            teacher_image_embeds: ``(B, D')``.
            teacher_text_embeds: ``(B, D')``.
            teacher_logit_scale: Scalar.

        Returns:
            Scalar float32 loss over the global batch and ``{"kd", "embedding", "icl", "contrastive"}`` (detached,
            unweighted; 0 for a disabled term).
        """
        b = image_embeds.shape[0]
        for name, t in (("text_embeds", text_embeds), ("teacher_image_embeds", teacher_image_embeds),
                        ("teacher_text_embeds", teacher_text_embeds)):
            if t.shape[0] != b:
                raise ValueError(f"{name} has batch size {t.shape[0]}: expected {b} like image_embeds")
        teacher_image_embeds, teacher_text_embeds = teacher_image_embeds.detach(), teacher_text_embeds.detach()
        if self.gather:
            image_embeds, text_embeds, teacher_image_embeds, teacher_text_embeds = gather_rows(
                image_embeds, text_embeds, teacher_image_embeds, teacher_text_embeds)
            b = image_embeds.shape[0]
        zero = image_embeds.new_zeros((), dtype=torch.float32)
        terms = {"kd": zero, "embedding": zero, "icl": zero, "contrastive": zero}
        sim = self._similarities(image_embeds, text_embeds, logit_scale)
        if self.kd_weight:
            teacher_sim = self._similarities(teacher_image_embeds, teacher_text_embeds, teacher_logit_scale.detach())
            i2t = kl_from_logprobs(safe_log_softmax(teacher_sim), safe_log_softmax(sim)).mean()
            t2i = kl_from_logprobs(safe_log_softmax(teacher_sim.t()), safe_log_softmax(sim.t())).mean()
            terms["kd"] = 0.5 * (i2t + t2i)
        if self.embedding_weight:
            image_term = self._embedding_term(image_embeds, teacher_image_embeds, self.image_projector)
            text_term = self._embedding_term(text_embeds, teacher_text_embeds, self.text_projector)
            # CLIP-KD's fd_loss adds the two modalities; the other kinds average them.
            terms["embedding"] = image_term + text_term if self.embedding_kind == "mse_mean" else 0.5 * (
                image_term + text_term)
        if self.icl_weight:
            terms["icl"] = self._icl_term(image_embeds, text_embeds, teacher_image_embeds, teacher_text_embeds)
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
        if self.icl_weight:
            loss = loss + self.icl_weight * terms["icl"]
        return loss, {k: v.detach() for k, v in terms.items()}

    def extra_repr(self) -> str:
        return (
            f"kd_weight={self.kd_weight}, embedding_weight={self.embedding_weight}, "
            f"contrastive_weight={self.contrastive_weight}, icl_weight={self.icl_weight}, "
            f"temperature={self.temperature}, embedding_kind={self.embedding_kind!r}, gather={self.gather}"
        )
