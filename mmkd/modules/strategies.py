"""Strategy presets by name, mapped onto Lightning strategies."""

from __future__ import annotations

from typing import Any

__all__ = ["STRATEGY_PRESETS", "build_strategy"]

STRATEGY_PRESETS = ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload", "fsdp")


def build_strategy(name: str, *, accelerator: str | None = None, recipe: Any = None, stage: str | None = None):
    """The Lightning strategy for a preset name (other Lightning strategy names pass through)."""
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Frozen parts (and the teacher, which is not a submodule) never receive gradients.
        return DDPStrategy(find_unused_parameters=False)
    return name
