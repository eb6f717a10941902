"""LLaVA-KD's objectives (Cai et al., 2024, arXiv:2410.16236): MDist over response and visual tokens, RDist.

Visual tokens are found through the models' visual-token masks (``ModelOutput.visual_mask``), never at fixed
positions: a sample may hold 0, 1 or more images, and teacher and student may see different numbers of visual
tokens per image (576 vs 729, say). Each side's visual positions are split into images when the per-image
token counts are given (``vision_features.shape[1]`` of each model); the images of a sample must then match in
number on both sides (an error names the sample otherwise). The longer side of each image is
adaptive-average-pooled to the shorter length. Pooling is done on logits, which equals pooling the hidden
states before the LM head (the head is linear and pooling weights sum to 1), so the chunked path pools
hidden states and never builds visual logits whole.

**Tokens that correspond.** LLaVA-KD's teacher and student share the vision tower, so their visual tokens match one
to one. When they do not (an any-resolution teacher: LLaVA-OneVision puts each image's ``g x g`` base grid first,
then the high-resolution tiles with a newline token per row), pooling the teacher's whole run would mix the base
grid and unrelated tiles into the student's tokens. ``image_base_tokens`` (``ModelOutput.image_base_tokens``, or
``base_tokens`` / ``teacher_base_tokens``) says how many tokens each image's base grid has: when it is set on a
side, only the first ``image_base_tokens`` positions of each of that side's images are paired (each image is then
a run of consecutive visual positions unless the side has a per-image count), and when the two sides' paired
counts differ and both are perfect squares the longer grid is pooled on the 2-D grid (``adaptive_avg_pool2d``);
otherwise 1-D pooling as above. With ``image_base_tokens`` None on both sides nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.contract import ModelOutput
from mmkd.losses._common import pool_pair, reduce, visual_groups
from mmkd.losses.chunked import chunked_token_loss
from mmkd.losses.divergences import ForwardKL, TokenDivergence


def _tokens_per_image(output: ModelOutput) -> int | None:
    return None if output.vision_features is None else int(output.vision_features.shape[1])


def aligned_visual_rows(
    features: Tensor,
    teacher_features: Tensor,
    visual_mask: Tensor,
    teacher_visual_mask: Tensor | None = None,
    tokens_per_image: int | None = None,
    teacher_tokens_per_image: int | None = None,
    base_tokens: int | None = None,
    teacher_base_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pair the visual tokens of both sides, image by image, pooling the longer side to the shorter length.

    Args:
        features: Student logits or hidden states ``(B, T, D)``.
        teacher_features: ``(B, T', D')``.
        visual_mask: ``(B, T)`` bool.
        teacher_visual_mask: ``(B, T')`` bool; None when ``visual_mask`` fits both sides.
        tokens_per_image: Student visual tokens per image, or None to treat each sample's visual tokens as one
            sequence (then per-image pairing is not checked).
        teacher_tokens_per_image: Teacher visual tokens per image.
        base_tokens: Student tokens of each image's base grid (``ModelOutput.image_base_tokens``): only those,
            the first of each image, are paired; None pairs every visual token.
        teacher_base_tokens: The teacher's.

    Returns:
        Aligned rows ``(M, D)`` and ``(M, D')``, M the total pooled visual tokens of the batch.
    """
    if teacher_visual_mask is None:
        teacher_visual_mask = visual_mask
    groups = _groups(features, teacher_features, visual_mask, teacher_visual_mask, tokens_per_image,
                     teacher_tokens_per_image, base_tokens, teacher_base_tokens)
    grid = _on_grid(base_tokens, teacher_base_tokens)
    pairs = [pool_pair(features[b, pos], teacher_features[b, tpos], grid) for b, pos, tpos in groups]
    if not pairs:
        return features.new_zeros((0, features.shape[-1])), teacher_features.new_zeros((0, teacher_features.shape[-1]))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _groups(
    features: Tensor,
    teacher_features: Tensor,
    visual_mask: Tensor,
    teacher_visual_mask: Tensor,
    tokens_per_image: int | None,
    teacher_tokens_per_image: int | None,
    base_tokens: int | None = None,
    teacher_base_tokens: int | None = None,
) -> list[tuple[int, Tensor, Tensor]]:
    for name, m, x in (("visual_mask", visual_mask, features), ("teacher_visual_mask", teacher_visual_mask,
                                                                 teacher_features)):
        if tuple(m.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} has shape {tuple(m.shape)}: expected {tuple(x.shape[:2])} (batch, positions)")
    if features.shape[0] != teacher_features.shape[0]:
        raise ValueError(f"student batch size {features.shape[0]} != teacher batch size {teacher_features.shape[0]}")
    if not _on_grid(base_tokens, teacher_base_tokens):
        return visual_groups(visual_mask.bool(), teacher_visual_mask.bool(), tokens_per_image,
                             teacher_tokens_per_image)
    # A base grid is found per image, so images are paired even without per-image counts (runs of positions).
    groups = visual_groups(visual_mask.bool(), teacher_visual_mask.bool(), tokens_per_image, teacher_tokens_per_image,
                           split_runs=True)
    return [(b, _base_grid(pos, base_tokens, b, "student"), _base_grid(tpos, teacher_base_tokens, b, "teacher"))
            for b, pos, tpos in groups]


def _on_grid(base_tokens: int | None, teacher_base_tokens: int | None) -> bool:
    return base_tokens is not None or teacher_base_tokens is not None


def _base_grid(positions: Tensor, base_tokens: int | None, sample: int, side: str) -> Tensor:
    """The first ``base_tokens`` of one image's visual positions (all of them when None)."""
    if base_tokens is None:
        return positions
    if positions.numel() < base_tokens:
        raise ValueError(f"sample {sample}: an image has {positions.numel()} {side} visual tokens, fewer than its "
                         f"image_base_tokens={base_tokens}")
    return positions[:base_tokens]


class MDist(nn.Module):
    """Multimodal distillation: ``w_r · D_r(response tokens) + w_v · D_v(visual tokens)``.

    ``D_r`` and ``D_v`` are token divergences (default forward KL, as in LLaVA-KD) between the teacher's and
    the student's next-token distributions, the first on answer tokens, the second on visual-token positions
    (paired and pooled as described in the module docstring). Each term is a mean over its tokens; a batch
    without images has a visual term of 0.

    Args:
        response_weight: ``w_r``.
        visual_weight: ``w_v``.
        response_divergence: ``D_r``; None means ``ForwardKL()``. Its reduction must be ``"mean"``.
        visual_divergence: ``D_v``; None means ``ForwardKL()``.
    """

    def __init__(
        self,
        response_weight: float = 1.0,
        visual_weight: float = 1.0,
        response_divergence: TokenDivergence | None = None,
        visual_divergence: TokenDivergence | None = None,
    ) -> None:
        super().__init__()
        self.response_weight, self.visual_weight = float(response_weight), float(visual_weight)
        self.response_divergence = response_divergence if response_divergence is not None else ForwardKL()
        self.visual_divergence = visual_divergence if visual_divergence is not None else ForwardKL()
        for name, div in (("response_divergence", self.response_divergence),
                          ("visual_divergence", self.visual_divergence)):
            if div.reduction != "mean":
                raise ValueError(f"{name} must use reduction='mean', got {div.reduction!r}")

    def visual_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        visual_mask: Tensor,
        teacher_visual_mask: Tensor | None = None,
        tokens_per_image: int | None = None,
        teacher_tokens_per_image: int | None = None,
        base_tokens: int | None = None,
        teacher_base_tokens: int | None = None,
    ) -> Tensor:
        """``D_v`` over the visual tokens, mean over pooled visual tokens; shapes as in :meth:`forward`."""
        rows, teacher_rows = aligned_visual_rows(
            student_logits, teacher_logits, visual_mask, teacher_visual_mask, tokens_per_image,
            teacher_tokens_per_image, base_tokens, teacher_base_tokens,
        )
        if rows.shape[0] == 0:
            return student_logits.sum().float() * 0.0
        return reduce(self.visual_divergence.per_token(rows, teacher_rows), "mean")

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor,
        teacher_mask: Tensor | None = None,
        *,
        visual_mask: Tensor,
        teacher_visual_mask: Tensor | None = None,
        tokens_per_image: int | None = None,
        teacher_tokens_per_image: int | None = None,
        base_tokens: int | None = None,
        teacher_base_tokens: int | None = None,
    ) -> Tensor:
        """MDist from full logits.

        Args:
            student_logits: ``(B, T, V)``.
            teacher_logits: ``(B, T', V)``.
            mask: ``(B, T)`` bool, the student's answer positions.
            teacher_mask: ``(B, T')`` bool, the teacher's positions of the same answer tokens (default ``mask``).
            visual_mask: ``(B, T)`` bool, the student's visual-token positions.
            teacher_visual_mask: ``(B, T')`` bool (default ``visual_mask``).
            tokens_per_image: Student visual tokens per image (``vision_features.shape[1]``), or None.
            teacher_tokens_per_image: Teacher visual tokens per image, or None.
            base_tokens: Student visual tokens of each image's base grid (pair only those), or None (all).
            teacher_base_tokens: The teacher's.

        Returns:
            Scalar float32.
        """
        loss = self.response_weight * self.response_divergence(student_logits, teacher_logits, mask, teacher_mask)
        if self.visual_weight:
            loss = loss + self.visual_weight * self.visual_loss(
                student_logits, teacher_logits, visual_mask, teacher_visual_mask, tokens_per_image,
                teacher_tokens_per_image, base_tokens, teacher_base_tokens,
            )
        return loss

    def from_outputs(
        self,
        student: ModelOutput,
        teacher: ModelOutput,
        mask: Tensor,
        teacher_mask: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> Tensor:
        """MDist from the output contract, chunk by chunk (no ``(tokens, V)`` logits exist whole).

        Visual masks, per-image token counts and base grids come from ``visual_mask``, ``vision_features`` and
        ``image_base_tokens`` of each output; outputs without a visual mask contribute no visual term.

        Args:
            student: Student output (``last_hidden (B, T, H)``, ``head_weight (V, H)``, ...).
            teacher: Teacher output (``last_hidden (B, T', H')``, ...).
            mask: ``(B, T)`` bool answer positions; ``teacher_mask`` ``(B, T')`` for the teacher's.
            teacher_mask: See ``mask``.
            chunk_size: Tokens per chunk (default: about 64 MiB of float32 logits per chunk).

        Returns:
            Scalar float32, equal to :meth:`forward` on the full logits.
        """
        heads = dict(head_weight=student.head_weight, teacher_head_weight=teacher.head_weight,
                     head_bias=student.head_bias, teacher_head_bias=teacher.head_bias, chunk_size=chunk_size)
        loss = self.response_weight * chunked_token_loss(
            self.response_divergence, student.last_hidden, teacher_hidden=teacher.last_hidden, mask=mask,
            teacher_mask=teacher_mask, **heads,
        )
        if self.visual_weight and student.visual_mask is not None and teacher.visual_mask is not None:
            rows, teacher_rows = aligned_visual_rows(
                student.last_hidden, teacher.last_hidden, student.visual_mask, teacher.visual_mask,
                _tokens_per_image(student), _tokens_per_image(teacher), student.image_base_tokens,
                teacher.image_base_tokens,
            )
            if rows.shape[0]:
                visual = chunked_token_loss(self.visual_divergence, rows, teacher_hidden=teacher_rows, **heads)
                loss = loss + self.visual_weight * visual
        return loss

    def extra_repr(self) -> str:
        return f"response_weight={self.response_weight}, visual_weight={self.visual_weight}"


class RDist(nn.Module):
    """Relation distillation: ``1 − cos(vec(R_S), vec(R_T))`` per image, mean over images.

    ``R = X Xᵀ`` is the ``(n, n)`` self-similarity matrix of an image's visual-token features X, so teacher and
    student widths may differ; token counts are matched by pooling as described in the module docstring. LLaVA-KD
    applies it to the visual tokens' logits; :meth:`from_outputs` uses the logits (computed through the head in
    ``H`` space: ``R = h (Wᵀ W) hᵀ`` plus bias terms, never building ``(n, V)`` logits) or the final hidden states.

    LLaVA-KD's released training code (``DistillLLaVATrainer.compute_loss``) takes ``R`` of the raw visual logits,
    ``logits @ logitsᵀ``, with no row normalisation: the default. ``normalize=True`` L2-normalises each token's
    features first, so ``R`` holds cosine similarities (mmkd's default before). That code computes one cosine over
    the flattened ``R`` of the whole micro-batch; with its one sample per device this is the per-image value here.

    Args:
        normalize: L2-normalise each token's features before the product.
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize

    def _relation_loss(self, gram: Tensor, teacher_gram: Tensor) -> Tensor:
        return 1.0 - F.cosine_similarity(gram.flatten(), teacher_gram.flatten(), dim=0, eps=1e-8)

    def _gram(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.normalize:
            x = F.normalize(x, dim=-1)
        return x @ x.t()

    def forward(
        self,
        features: Tensor,
        teacher_features: Tensor,
        visual_mask: Tensor,
        teacher_visual_mask: Tensor | None = None,
        tokens_per_image: int | None = None,
        teacher_tokens_per_image: int | None = None,
        base_tokens: int | None = None,
        teacher_base_tokens: int | None = None,
    ) -> Tensor:
        """RDist from explicit features.

        Args:
            features: Student visual-token features (logits or hidden states) ``(B, T, D)``.
            teacher_features: ``(B, T', D')``.
            visual_mask: ``(B, T)`` bool.
            teacher_visual_mask: ``(B, T')`` bool (default ``visual_mask``).
            tokens_per_image: Student visual tokens per image, or None (each sample's visual tokens are one
                sequence).
            teacher_tokens_per_image: Teacher visual tokens per image, or None.
            base_tokens: Student visual tokens of each image's base grid (relate only those), or None (all).
            teacher_base_tokens: The teacher's.

        Returns:
            Scalar float32; 0 for a batch without images.
        """
        teacher_features = teacher_features.detach()
        if teacher_visual_mask is None:
            teacher_visual_mask = visual_mask
        groups = _groups(features, teacher_features, visual_mask, teacher_visual_mask, tokens_per_image,
                         teacher_tokens_per_image, base_tokens, teacher_base_tokens)
        grid = _on_grid(base_tokens, teacher_base_tokens)
        losses = []
        for b, pos, tpos in groups:
            x, tx = pool_pair(features[b, pos], teacher_features[b, tpos], grid)
            losses.append(self._relation_loss(self._gram(x), self._gram(tx)))
        if not losses:
            return features.sum().float() * 0.0
        return torch.stack(losses).mean()

    def _logit_gram(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, head_gram: Tensor) -> Tensor:
        # Logits L = h Wᵀ + 1 bᵀ, so L Lᵀ = h (WᵀW) hᵀ + (hWᵀb) 1ᵀ + 1 (hWᵀb)ᵀ + |b|² 1 1ᵀ.
        h = hidden.float()
        gram = h @ head_gram @ h.t()
        if bias is not None:
            hb = h @ (weight.float().t() @ bias.float())
            gram = gram + hb[:, None] + hb[None, :] + bias.float().pow(2).sum()
        if self.normalize:
            norm = gram.diagonal().clamp(min=1e-16).sqrt()
            gram = gram / (norm[:, None] * norm[None, :])
        return gram

    def from_outputs(self, student: ModelOutput, teacher: ModelOutput, on: str = "logits") -> Tensor:
        """RDist from the output contract's visual masks, per-image token counts and base grids.

        Args:
            student: Student output.
            teacher: Teacher output.
            on: ``"logits"`` (LLaVA-KD; computed in hidden space) or ``"hidden"`` (final hidden states).

        Returns:
            Scalar float32; 0 when either output has no visual mask or the batch has no images.
        """
        if on not in ("logits", "hidden"):
            raise ValueError(f"on={on!r}: expected 'logits' or 'hidden'")
        if student.visual_mask is None or teacher.visual_mask is None:
            return student.last_hidden.sum().float() * 0.0
        tpi, teacher_tpi = _tokens_per_image(student), _tokens_per_image(teacher)
        base, teacher_base = student.image_base_tokens, teacher.image_base_tokens
        if on == "hidden":
            return self(student.last_hidden, teacher.last_hidden, student.visual_mask, teacher.visual_mask, tpi,
                        teacher_tpi, base, teacher_base)
        hidden, teacher_hidden = student.last_hidden, teacher.last_hidden.detach()
        groups = _groups(hidden, teacher_hidden, student.visual_mask, teacher.visual_mask, tpi, teacher_tpi, base,
                         teacher_base)
        grid = _on_grid(base, teacher_base)
        if not groups:
            return hidden.sum().float() * 0.0
        head_gram = _gram(student.head_weight)
        with torch.no_grad():
            teacher_head_gram = _gram(teacher.head_weight)
        losses = []
        for b, pos, tpos in groups:
            x, tx = pool_pair(hidden[b, pos], teacher_hidden[b, tpos], grid)
            gram = self._logit_gram(x, student.head_weight, student.head_bias, head_gram)
            with torch.no_grad():
                teacher_gram = self._logit_gram(tx, teacher.head_weight, teacher.head_bias, teacher_head_gram)
            losses.append(self._relation_loss(gram, teacher_gram))
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


def _gram(weight: Tensor) -> Tensor:
    """``WᵀW`` (H, H) in float32 from one float32 view of the head (``W.float()`` twice made two (V, H) copies, and
    autograd kept both for a trained head: 1.1 GB at V = 151,936, H = 896). No copy at all for a float32 head."""
    w = weight.float()
    return w.t() @ w
