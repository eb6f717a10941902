"""Teachers: loaded once for the stages that need them, placed per strategy, released before a stage that does not.

:class:`TeacherPool` loads the recipe's teacher lazily, the first time a stage whose task needs it starts, keeps it
across consecutive stages that need it, and releases it before a stage that does not (its parameters are freed,
or parked in host memory when a later stage needs it again and it sits on an accelerator). A teacher that a ZeRO-3
stage partitioned is loaded whole again for the next stage that needs it.

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
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TeacherPool", "is_partitioned", "is_quantized", "place_teacher"]


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
    from mmkd.train.strategies import is_zero3, persist_output_heads

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


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


class TeacherPool:
    """The recipe's teacher, loaded once for the stages that need it and released before a stage that does not.

    Args:
        load: Builds the teacher (the recipe's ``teacher`` component), or None for a recipe without one.
        view: Builds the teacher's input side without its weights (``ImageTextModel.input_view``), for stages that
            read the teacher from a cache.
    """

    def __init__(self, load: Callable[[], nn.Module] | None, view: Callable[[], Any] | None = None):
        self._load = load
        self._view_fn = view
        self._view: Any = None
        self._teacher: nn.Module | None = None
        self._parked: torch.device | None = None  # where a parked teacher came from
        self.loads = 0  # how many times the teacher was built

    @property
    def loaded(self) -> nn.Module | None:
        """The teacher when it is in memory, else None."""
        return self._teacher

    def inputs(self) -> Any:
        """The teacher's input side (processor, config, identity) for a stage that reads it from a cache: the loaded
        teacher's own when it is in memory, else built once from its folder or hub id without weights."""
        if self._teacher is not None and getattr(self._teacher, "inputs_view", None) is not None:
            return self._teacher.inputs_view
        if self._view is None:
            if self._view_fn is None:
                raise ValueError("the recipe has no teacher whose inputs a cached stage could build")
            self._view = self._view_fn()
        return self._view

    def get(self) -> nn.Module | None:
        """The teacher, loaded (or loaded whole again after a ZeRO-3 stage partitioned it) when needed."""
        if self._teacher is not None and is_partitioned(self._teacher):
            self.release()  # a ZeRO-3 stage split it into partitions: load it whole again
        if self._teacher is None and self._load is not None:
            self._teacher = self._load()
            self.loads += 1
        elif self._teacher is not None and self._parked is not None:
            self._teacher.to(self._parked)
        self._parked = None
        return self._teacher

    def release(self, needed_later: bool = False) -> None:
        """Before a stage without a teacher: free its memory on the accelerators.

        Args:
            needed_later: A later stage needs the teacher again. A replica on an accelerator is then parked in host
                memory (moved to the CPU: a reload from disk costs minutes for a 7B model). Otherwise (a teacher on
                the CPU, a partitioned or quantized one, or none needed later) every reference is dropped and its
                memory freed; a later stage loads it again.
        """
        teacher = self._teacher
        if teacher is None:
            return
        device = _device_of(teacher)
        if needed_later and device.type != "cpu" and not is_partitioned(teacher) and not is_quantized(teacher):
            teacher.to("cpu")
            self._parked = device
        else:
            self._teacher = None
            self._parked = None
            del teacher
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
