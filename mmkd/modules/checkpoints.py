"""Reading student weights out of Lightning and DeepSpeed checkpoints (no teacher is ever in them)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load_student_state"]


def load_student_state(path: str | Path) -> dict[str, Tensor]:
    """The student's state dict from a stage checkpoint: a Lightning file or a DeepSpeed folder.

    Args:
        path: ``step-XXXXXXXX.ckpt`` as the runner writes it.

    Returns:
        Keys as in ``student.state_dict()``.
    """
    path = Path(path)
    if path.is_dir():  # DeepSpeed: gather the (possibly ZeRO-partitioned) fp32 weights into one state dict
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "student."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{path}: no student weights in this checkpoint (expected keys starting with 'student.')")
    return out
