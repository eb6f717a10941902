"""Where the frozen teacher lives under each strategy: a replica, or ZeRO-3 partitions gathered for inference.

The teacher is never a submodule of the LightningModule (so never in the optimizer, in DDP's buckets, in FSDP's
flat parameters or in a checkpoint). :func:`place_teacher` puts it where the stage's strategy wants it:

* single device, DDP, FSDP, ZeRO-2: a full replica on each rank's device (``teacher.to(device)``).
* ZeRO-3 (``deepspeed_stage_3``, ``deepspeed_stage_3_offload``): the teacher gets its own optimizer-less
  DeepSpeed engine. DeepSpeed converts the *already loaded* parameters into partitions (each rank keeps
  ``1/world`` of every tensor) and installs hooks that all-gather a block's weights right before it runs and
  free them after, so a teacher larger than one device fits. Partitioning what was loaded, rather than building
  the teacher inside ``deepspeed.zero.Init``, is what keeps the weights right: a model built under ``zero.Init``
  outside the training engine has empty partitions and no gather hooks (Lightning #17319, "weight must be
  2-D"), and ``from_pretrained`` under ``zero.Init`` needs transformers' own DeepSpeed hook-up.
* A quantized teacher (bitsandbytes 4-bit/8-bit) stays a replica under every strategy: its packed weights
  cannot be split by ZeRO, and at 4 bits a replica costs about what a bf16 partition over 4 ranks does.
"""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

__all__ = ["is_partitioned", "is_quantized", "place_teacher"]


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes-quantized weights."""
    if getattr(model, "quantize", None):
        return True
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (they carry DeepSpeed's ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _teacher_config(strategy: Any) -> dict[str, Any]:
    """The inference config of the teacher's engine: the student's ZeRO-3 settings and precision, no optimizer."""
    zero = dict(strategy.config.get("zero_optimization") or {})
    keep = ("stage", "offload_param", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
            "stage3_prefetch_bucket_size", "stage3_max_reuse_distance")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {k: zero[k] for k in keep if k in zero},
    }
    for key in ("bf16", "fp16"):  # the teacher runs in the training precision (half the bytes per partition)
        if (strategy.config.get(key) or {}).get("enabled"):
            config[key] = {"enabled": True}
    return config


def place_teacher(teacher: nn.Module, strategy: Any, device: Any) -> Any:
    """Put the frozen teacher where the strategy runs it; call on every rank once the process group exists.

    Args:
        teacher: The loaded, frozen teacher (eval mode, ``requires_grad`` off).
        strategy: The Trainer's strategy.
        device: This rank's device.

    Returns:
        The teacher's DeepSpeed engine under ZeRO-3 (keep a reference for the stage: it owns the gather hooks;
        calling the teacher module itself runs them), else None.
    """
    from mmkd.modules.strategies import is_zero3, persist_output_heads

    if not is_zero3(strategy) or is_quantized(teacher):
        if not is_quantized(teacher):  # bitsandbytes places quantized weights itself when they load
            teacher.to(device)
        return None
    if is_partitioned(teacher):
        raise RuntimeError("the teacher is already partitioned by an earlier stage; rebuild it from the recipe")
    import deepspeed

    engine, *_ = deepspeed.initialize(
        args=argparse.Namespace(device_rank=strategy.root_device.index),
        model=teacher,
        config=_teacher_config(strategy),
        model_parameters=[],
        dist_init_required=False,
    )
    persist_output_heads(engine)  # the objectives read the head after the forward
    teacher.eval()
    return engine
