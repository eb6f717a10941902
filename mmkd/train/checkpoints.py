"""Reading student weights out of Lightning and DeepSpeed checkpoints (no teacher is ever in them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["final_student", "load_stage_checkpoint", "load_student_state"]


def load_student_state(path: str | Path) -> dict[str, Tensor]:
    """The student's state dict from a stage checkpoint: a Lightning file or a DeepSpeed folder.

    A DeepSpeed folder (ZeRO-2 or ZeRO-3, any number of ranks) is consolidated into fp32 weights from the
    optimizer's master copies. Checkpoints written by mmkd's DeepSpeed strategy leave frozen parameters out
    (``exclude_frozen_parameters``): the result then holds only the stage's trainable parameters, and the frozen
    ones come from the stage's ``init_from`` (see :func:`final_student`).

    Args:
        path: ``step-XXXXXXXX.ckpt`` as the runner writes it.

    Returns:
        Keys as in ``student.state_dict()``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.is_dir():  # DeepSpeed: gather the (possibly ZeRO-partitioned) fp32 weights into one state dict
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if not (path / "latest").is_file():
            raise ValueError(f"{path}: not a DeepSpeed checkpoint folder (no 'latest' file inside)")
        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "student."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{path}: no student weights in this checkpoint (expected keys starting with 'student.')")
    return out


def final_student(
    module: Any, strategy: Any, checkpoint: str | Path | None, rebuild: Callable[[], nn.Module]
) -> nn.Module:
    """The whole student at the end of a stage, to save as its folder; call on global rank 0 only.

    Outside DeepSpeed this is the trained module's student. Under DeepSpeed the module holds ZeRO-3 partitions
    (empty tensors on each rank) or, in bf16/fp16, half-precision copies of fp32 master weights; the student
    is then rebuilt from the stage's ``init_from`` (``rebuild``), which supplies the frozen parts, and its
    trained parts are loaded in fp32 from the stage's last checkpoint.

    Args:
        module: The stage's LightningModule (``module.student``).
        strategy: The Trainer's strategy.
        checkpoint: The stage's last checkpoint (written at its final step).
        rebuild: Builds the stage's starting student again.
    """
    from mmkd.train.strategies import is_deepspeed, load_without_frozen

    if not is_deepspeed(strategy):
        return module.student
    if checkpoint is None:
        raise RuntimeError("a DeepSpeed stage ended without a checkpoint to take the student's weights from")
    frozen = {n for n, p in module.student.named_parameters() if not p.requires_grad}
    student = rebuild()
    load_without_frozen(student, load_student_state(checkpoint), source=str(checkpoint), frozen=frozen)
    return student


def load_stage_checkpoint(student: nn.Module, path: str | Path, train_parts: Sequence[str]) -> nn.Module:
    """Load a stage checkpoint into a freshly built student of that stage (``Runner.build_student``).

    The frozen parts (every part not in ``train_parts``) may be missing from the checkpoint, as DeepSpeed
    checkpoints leave them out; they keep the values the student was built with (the stage's ``init_from``).
    Any other missing or unexpected key is an error.

    Args:
        student: The stage's starting student.
        path: A step checkpoint, Lightning file or DeepSpeed folder.
        train_parts: The stage's ``train`` list.

    Returns:
        ``student``, loaded.
    """
    from mmkd.train.strategies import load_without_frozen

    parts = student.parts()
    trained = {id(p) for part in train_parts for p in parts.get(part, [])}
    frozen = {n for n, p in student.named_parameters() if id(p) not in trained}
    load_without_frozen(student, load_student_state(path), source=str(path), frozen=frozen)
    return student
