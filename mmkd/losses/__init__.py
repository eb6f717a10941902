"""Distillation objectives as ``nn.Module``s over tensors (no Lightning): see docs/objectives.md."""

from mmkd.losses.chunked import chunked_token_loss, default_chunk_size, fused_head_loss
from mmkd.losses.clip import CLIPDistill, clamp_logit_scale_
from mmkd.losses.divergences import (
    JSD,
    ForwardKL,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    TokenDivergence,
    TotalVariation,
    build_divergence,
)
from mmkd.losses.feature import FeatureDistill
from mmkd.losses.llava_kd import MDist, RDist, aligned_visual_rows
from mmkd.losses.preference import DPODistill, sequence_logprobs
from mmkd.losses.taid import TAID
from mmkd.losses.topk import TopKKL, topk_from_logits

__all__ = [
    "CLIPDistill",
    "DPODistill",
    "FeatureDistill",
    "ForwardKL",
    "JSD",
    "MDist",
    "RDist",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "TAID",
    "TokenDivergence",
    "TopKKL",
    "TotalVariation",
    "aligned_visual_rows",
    "build_divergence",
    "clamp_logit_scale_",
    "chunked_token_loss",
    "default_chunk_size",
    "fused_head_loss",
    "sequence_logprobs",
    "topk_from_logits",
]
