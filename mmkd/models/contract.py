"""The one output contract that every teacher and student returns, and that every loss reads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ModelOutput:
    """What one forward pass of an MLLM teacher or student gives the objectives.

    Logits are not stored: they are computed on demand from ``last_hidden`` and the head, whole or in
    chunks, so that a ``(tokens, V)`` tensor exists only when an objective asks for it.

    Attributes:
        last_hidden: Final (normed) hidden states ``(B, T, H)``.
        head_weight: LM head weight ``(V, H)``.
        head_bias: LM head bias ``(V,)`` or None.
        hidden_states: Per-layer hidden states, each ``(B, T, H)``, when asked for.
        vision_features: Visual tokens after the projector, ``(N_img, N, H)``, or None without images.
        visual_mask: ``(B, T)`` bool, True at visual-token positions of the sequence.
        aux_loss: Scalar MoE router loss (load balancing + z-loss, already weighted), or None.
    """

    last_hidden: Tensor
    head_weight: Tensor
    head_bias: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    vision_features: Tensor | None = None
    visual_mask: Tensor | None = None
    aux_loss: Tensor | None = None

    def logits(self, hidden: Tensor | None = None) -> Tensor:
        """Logits for ``hidden`` (default: every position), ``(..., V)``."""
        h = self.last_hidden if hidden is None else hidden
        out = h @ self.head_weight.t()
        return out if self.head_bias is None else out + self.head_bias


@dataclass
class CLIPOutput:
    """What a CLIP teacher or student gives: embeddings (not normalised) and its logit scale.

    Attributes:
        image_embeds: ``(B, D)``.
        text_embeds: ``(B, D)``.
        logit_scale: Scalar, already exponentiated.
    """

    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor
