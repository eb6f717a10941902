"""Strategy presets by name, mapped onto Lightning strategies.

A recipe names its strategy (``trainer.strategy``); :func:`build_strategy` turns the name into a configured
Lightning strategy:

========================== ===================================================================================
``auto``                   Lightning's choice (one device: no wrapping; several: DDP).
``ddp``                    :class:`~lightning.pytorch.strategies.DDPStrategy`; the student's trainable parts only
                           (the teacher is no submodule, frozen parts are skipped by DDP).
``deepspeed_stage_2``      ZeRO-2: optimizer states and gradients partitioned; teacher replicated per rank.
``deepspeed_stage_3``      ZeRO-3: parameters partitioned too; the teacher is partitioned for inference
                           (:func:`mmkd.train.teachers.place_teacher`).
``deepspeed_stage_3_offload`` ZeRO-3 with optimizer states and parameters offloaded to CPU memory.
``fsdp``                   :class:`~lightning.pytorch.strategies.FSDPStrategy`, full sharding, one unit per
                           transformer block of the student; teacher replicated per rank.
========================== ===================================================================================

Precision, gradient clipping and accumulation come from the Trainer (Lightning passes them into the DeepSpeed
config); the micro-batch comes from the stage's global batch (:class:`mmkd.train.recipe.StageSpec`).
Any other Lightning strategy name passes through unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn

from mmkd.train.recipe.validate import STRATEGY_PRESETS  # one list of preset names, shared with the recipe checks

__all__ = ["CONFIG_ENV", "STRATEGY_PRESETS", "MMKDDeepSpeedStrategy", "build_strategy", "is_deepspeed", "is_zero3",
           "load_without_frozen", "persist_output_heads"]

# A JSON file whose keys are merged over a DeepSpeed preset's config (buckets, persistence thresholds, offload
# devices): tuning that changes how a run executes, not what it computes, so it stays out of the recipe.
CONFIG_ENV = "MMKD_DEEPSPEED_CONFIG"


_DEEPSPEED = {
    "deepspeed_stage_2": dict(stage=2),
    "deepspeed_stage_3": dict(stage=3),
    "deepspeed_stage_3_offload": dict(stage=3, offload_optimizer=True, offload_parameters=True),
}


class MMKDDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, also on the CPU, with checkpoints that leave frozen parameters out.

    The same class runs on GPUs and on CPUs, so that the DeepSpeed code path (ZeRO partitioning, DeepSpeed
    checkpoint folders, resume) is the one CI tests. Two differences from Lightning's class:

    * **CPU accelerator.** Lightning refuses any accelerator other than CUDA, though DeepSpeed itself ships a CPU
      accelerator (chosen automatically without CUDA, or with ``DS_ACCELERATOR=cpu``) that runs ZeRO over gloo.
      On a CPU accelerator this class skips the CUDA check of ``setup_environment`` and the device-index
      validation of ``setup_distributed`` (CPU devices carry no index), and reports ``cpu:0`` as the root
      device, because DeepSpeed reads the device index from it. On CUDA nothing changes.
    * **Frozen parameters.** Checkpoints are written with DeepSpeed's ``exclude_frozen_parameters`` (a frozen
      vision tower or a frozen LM in a projector-only stage makes most of a student's bytes). On resume the
      runner rebuilds the student from the stage's ``init_from``, which is exactly where frozen parameters stay;
      loading then accepts missing keys only for parameters that are frozen in this stage and fails on any other
      missing or unexpected key.
    """

    def __init__(self, *args: Any, exclude_frozen_parameters: bool = True, **kwargs: Any):
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        extra = os.environ.get(CONFIG_ENV)
        if extra and self.config is not None:
            try:
                overrides = json.loads(Path(extra).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{CONFIG_ENV}={extra}: expected a readable JSON file ({err})") from None
            _merge(self.config, overrides)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning already divides the loss by accumulate_grad_batches; DeepSpeed's engine.backward would divide
        # it by gradient_accumulation_steps again, leaving gradients 1/k too small (gradient clipping then bites
        # k times later than under DDP).
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _initialize_deepspeed_train(self, model: nn.Module) -> None:
        super()._initialize_deepspeed_train(model)
        if self.zero_stage_3:
            persist_output_heads(self.model)

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu:
            return torch.device("cpu", 0)
        return super().root_device

    def setup_environment(self) -> None:
        if self._on_cpu:
            DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's CUDA-only check, keep the rest
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            super().setup_distributed()
            return
        import deepspeed.ops
        from lightning.fabric.utilities.seed import reset_seed

        # DeepSpeed's CPU communication backend compiles a shared-memory all-reduce kernel (minutes on a small
        # machine) that serves only tensor-parallel inference; training collectives go through gloo. Marking the
        # op unavailable in DeepSpeed's compatibility table (cached, meant to be edited) skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if not self.exclude_frozen_parameters or self.load_full_weights:
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.fabric.strategies.deepspeed import _validate_checkpoint_directory
        from lightning.pytorch.trainer.states import TrainerFn

        _validate_checkpoint_directory(checkpoint_path)
        module = self.lightning_module
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        _, client_state = self.deepspeed_engine.load_checkpoint(
            str(checkpoint_path), load_optimizer_states=fitting, load_lr_scheduler_states=False,
            custom_load_fn=lambda src, dst: load_without_frozen(dst, src, source=str(checkpoint_path)),
        )
        if client_state is None:
            raise FileNotFoundError(f"{checkpoint_path}: not a DeepSpeed checkpoint folder (no 'latest' tag inside)")
        return client_state


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def persist_output_heads(engine: Any) -> list[nn.Parameter]:
    """Keep the LM heads of a ZeRO-3 engine's model gathered on every rank for the whole stage.

    The output contract hands the LM head weight to the objectives, which compute logits chunk by chunk *after*
    the model's forward (and the head module's own forward never runs). ZeRO-3 gathers a parameter only while
    its module runs, so the head would reach the loss as an empty partition. Marking it persistent (DeepSpeed's
    mechanism for small parameters) keeps it whole; DeepSpeed re-gathers persistent parameters after each
    optimizer step, and gradients are still reduce-scattered into the partitions. Cost: one full ``(V, H)``
    head per rank (272 MB for Qwen2-0.5B in bf16).

    Args:
        engine: A ZeRO-3 ``DeepSpeedEngine`` (training or inference).

    Returns:
        The parameters made persistent.
    """
    optimizer = engine.optimizer
    persistent = getattr(optimizer, "persistent_parameters", None)
    if persistent is None:  # the training optimizer shares the list of its parameter_offload
        persistent = optimizer.parameter_offload.persistent_parameters
    heads: list[nn.Parameter] = []
    for sub in engine.module.modules():
        get_head = getattr(sub, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        for param in (getattr(head, "weight", None), getattr(head, "bias", None)):
            if param is not None and hasattr(param, "ds_id") and not any(param is h for h in heads):
                heads.append(param)
    for param in heads:
        if not param.ds_persist:
            param.ds_persist = True
            persistent.append(param)
    if heads:
        heads[0].all_gather(param_list=heads)
    return heads


def load_without_frozen(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint", frozen: set[str] | None = None
) -> None:
    """``module.load_state_dict(state)`` where only frozen parameters may be missing.

    Args:
        module: The module to load into (its frozen parameters already hold their ``init_from`` values).
        state: A state dict saved with ``exclude_frozen_parameters``.
        source: Where ``state`` comes from, for the error message.
        frozen: Names of the parameters that may be missing (default: ``module``'s parameters without grad).
    """
    result = module.load_state_dict(state, strict=False)
    if frozen is None:
        frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {list(result.unexpected_keys)[:3]}"
        raise ValueError(f"{source}: the checkpoint does not fit this stage's student ({what})")


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` (a Lightning strategy) is DeepSpeed."""
    return isinstance(strategy, DeepSpeedStrategy)


def is_zero3(strategy: Any) -> bool:
    """Whether ``strategy`` partitions parameters (DeepSpeed ZeRO stage 3)."""
    if not is_deepspeed(strategy):
        return False
    zero = (strategy.config or {}).get("zero_optimization") or {}
    return zero.get("stage") == 3


def _has_experts(student: nn.Module | None) -> bool:
    if student is None:
        return True  # unknown: assume the worst
    return any("experts" in name for name, _ in student.named_modules())


def _transformer_blocks(student: nn.Module | None) -> set[type[nn.Module]] | None:
    """The student's repeated block classes (Hugging Face ``_no_split_modules``), FSDP's wrapping units."""
    if student is None:
        return None
    names: set[str] = set()
    for sub in student.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    blocks = {type(sub) for sub in student.modules() if type(sub).__name__ in names}
    return blocks or None


def build_strategy(
    name: str,
    *,
    accelerator: str | None = None,
    spec: Any = None,
    student: nn.Module | None = None,
):
    """The Lightning strategy for a preset name (other Lightning strategy names pass through).

    Args:
        name: A preset of :data:`STRATEGY_PRESETS` or any Lightning strategy name.
        accelerator: The Trainer's accelerator (``cpu`` selects DeepSpeed's CPU path; nothing else changes).
        spec: The stage (:class:`mmkd.train.recipe.StageSpec`), for its micro-batch and trainable parts.
        student: The stage's student, for FSDP's wrapping units.
    """
    train_parts = set(spec.train) if spec is not None else set()
    if name == "ddp":
        # DDP wraps only trainable parameters (the teacher is no submodule). Some of them can get no gradient on
        # one rank in one step: the projector (and a trained vision tower) when that rank's micro-batch is
        # text-only, unrouted MoE experts. DDP must then look for them, or the ranks' all-reduces stop matching
        # and the run hangs. Only a dense language model trained alone is used by every batch.
        dense_lm_only = train_parts <= {"language_model"} and not _has_experts(student)
        return DDPStrategy(find_unused_parameters=not dense_lm_only)
    if name in _DEEPSPEED:
        kwargs: dict[str, Any] = dict(_DEEPSPEED[name])
        if spec is not None:
            # DeepSpeed's train_batch_size = micro x accumulation x world must agree with the recipe's global batch.
            kwargs["logging_batch_size_per_gpu"] = spec.micro_batch_size
        strategy = MMKDDeepSpeedStrategy(**kwargs)
        if kwargs.get("offload_optimizer") and strategy.config is not None:
            # DeepSpeed refuses a client optimizer with offload unless told to take it: mmkd's torch AdamW then
            # steps on the CPU (DeepSpeed's compiled CPU Adam would be faster; not wired in yet).
            strategy.config.setdefault("zero_force_ds_cpu_optimizer", False)
        return strategy
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # use_orig_params: frozen and trainable parameters share flat parameters inside one block.
        # Full state dicts: one checkpoint file that load_student_state and resume read like a DDP one.
        return FSDPStrategy(
            auto_wrap_policy=_transformer_blocks(student), sharding_strategy="FULL_SHARD", use_orig_params=True,
            state_dict_type="full", limit_all_gathers=True,
        )
    return name
