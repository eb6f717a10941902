"""LLaVA-KD's objectives over the output contract: MDist (response and visual tokens) and RDist (relations)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mmkd.contract import DistillBatch, ModelOutput
from mmkd.losses import MDist, RDist, build_divergence
from mmkd.objectives.base import Objective, answer_positions

__all__ = ["MDistObjective", "RDistObjective"]

DivergenceName = Literal["fkl", "rkl", "jsd", "tv", "skl", "srkl"]


class MDistObjective(Objective):
    """``mdist``: ``response_weight · D(response tokens) + visual_weight · D(visual tokens)`` (LLaVA-KD's MDist).

    Args:
        response_weight: Weight of the response-token divergence.
        visual_weight: Weight of the visual-token divergence (0 leaves only the response term).
        divergence: The divergence by short name (``fkl``, the paper's, ``rkl``, ``jsd``, ``tv``, ``skl``,
            ``srkl``).
        visual_divergence: The visual term's divergence; None: the same as ``divergence``.
        temperature: Divides both sides' logits in both terms.
        chunk_size: Tokens per chunk of logits (default: about 64 MiB of float32 logits per chunk).
    """

    def __init__(self, response_weight: float = 1.0, visual_weight: float = 1.0,
                 divergence: DivergenceName = "fkl", visual_divergence: DivergenceName | None = None,
                 temperature: float = 1.0, chunk_size: int | None = None) -> None:
        super().__init__()
        self.loss = MDist(response_weight, visual_weight, build_divergence(divergence, temperature=temperature),
                          build_divergence(visual_divergence or divergence, temperature=temperature))
        self.chunk_size = chunk_size

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: DistillBatch) -> Tensor:
        return self.loss.from_outputs(student, teacher, answer_positions(batch.labels),
                                      answer_positions(batch.teacher_side()[1]), chunk_size=self.chunk_size)


class RDistObjective(Objective):
    """``rdist``: relation (self-similarity) distillation between visual tokens (LLaVA-KD's RDist).

    Args:
        on: ``logits`` (LLaVA-KD: relations of the visual tokens' output distributions, computed in hidden space)
            or ``hidden`` (relations of the final hidden states).
        normalize: L2-normalise each token's features before the product (cosine similarities). False is LLaVA-KD's
            released code: the relation of the raw logits, ``L Lᵀ``.
    """

    def __init__(self, on: Literal["logits", "hidden"] = "logits", normalize: bool = False) -> None:
        super().__init__()
        self.on = on
        self.loss = RDist(normalize=normalize)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: DistillBatch) -> Tensor:
        return self.loss.from_outputs(student, teacher, on=self.on)
