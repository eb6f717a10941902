"""The recipe schema: typed dataclasses whose fields are the recipe's keys (and its command-line options).

Fields marked ``execution`` change how a run executes, not what it computes: they may differ when a run resumes
(the change is recorded in the manifest). :data:`EXECUTION_KEYS` is derived from these marks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "EXECUTION_KEYS",
    "PRECISIONS",
    "SCHEDULES",
    "OptimizerConfig",
    "SQAEvalConfig",
    "ScheduleConfig",
    "StageConfig",
    "TRAINER_DEFAULTS",
    "TrainerConfig",
]

_EXECUTION = {"execution": True}

# Lightning's precision values (lightning.fabric.connector._PRECISION_INPUT; a test keeps the two equal), so that a
# bad precision is refused when the recipe loads without importing Lightning.
Precision = Literal["transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                    "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16"]
PRECISIONS: tuple[str, ...] = Precision.__args__

# mmkd's own schedules (warmup, then decay; see mmkd.train.optim) and transformers' schedulers by name.
MMKD_SCHEDULES = ("cosine", "linear", "constant")
TRANSFORMERS_SCHEDULES = ("cosine_with_restarts", "polynomial", "constant_with_warmup", "inverse_sqrt",
                          "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
SCHEDULES = MMKD_SCHEDULES + TRANSFORMERS_SCHEDULES


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer of one stage.

    Args:
        name: ``adamw``, ``adam``, ``sgd`` (momentum 0.9), or the class path of any ``torch.optim.Optimizer``
            (``torch.optim.RMSprop``, ``bitsandbytes.optim.AdamW8bit``...).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay; never applied to norms and biases.
        betas: Adam betas (also passed to a class path whose constructor takes ``betas``).
        eps: Adam epsilon (likewise).
        part_lr: Learning rate per student part (``projector: 1e-3``), overriding ``lr`` for that part.
        args: Further constructor arguments of the optimizer class (checked against its signature at load).
    """

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    part_lr: dict[str, float] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine/linear decay or constant (or a transformers scheduler).

    Args:
        name: ``cosine``, ``linear`` or ``constant`` after warmup (mmkd's: the first warmup step already gets
            ``lr / warmup``), or a transformers scheduler (``cosine_with_min_lr``, ``warmup_stable_decay``,
            ``inverse_sqrt``, ``polynomial``, ``cosine_with_restarts``, ``constant_with_warmup``).
        warmup_ratio: Fraction of the stage's optimizer steps spent warming up (ignored if ``warmup_steps``).
        warmup_steps: Warmup length in optimizer steps.
        min_lr_ratio: Final learning rate as a fraction of the peak (mmkd's schedules).
        args: Scheduler-specific arguments of a transformers scheduler (``num_cycles``, ``power``, ...).
    """

    name: Literal["cosine", "linear", "constant", "cosine_with_restarts", "polynomial", "constant_with_warmup",
                  "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainerConfig:
    """Lightning Trainer settings; in a stage, only the keys that are set override the recipe's.

    Args:
        accelerator: ``cpu``, ``gpu``, ``cuda``, ``auto``.
        devices: Devices per node.
        num_nodes: Number of nodes.
        strategy: ``auto``, ``ddp``, ``deepspeed_stage_2``, ``deepspeed_stage_3``, ``deepspeed_stage_3_offload``,
            ``fsdp``, or any other Lightning strategy name.
        precision: ``32-true``, ``bf16-mixed``, ``16-mixed``, ... (Lightning's values).
        max_steps: Optimizer steps of the stage (-1: run ``max_epochs``).
        max_epochs: Epochs of the stage.
        gradient_clip_val: Gradient-norm clipping.
        log_every_n_steps: Logging interval.
        val_check_interval: Validation interval (Lightning semantics).
        limit_val_batches: Validation batches per check.
        logger: Any Lightning logger as ``class_path``/``init_args``, beside each stage's CSV file: one run for the
            whole recipe in ``RUN_DIR/logs/<logger>`` (its default ``save_dir``), keys prefixed by the stage's name.
            Default: CSV only; false: none.
        enable_progress_bar: Show the rich progress bar.
        checkpoint_every_n_steps: Write a resumable checkpoint every N optimizer steps.
        keep_checkpoints: How many step checkpoints to keep per stage.
        num_workers: DataLoader workers per process.
    """

    accelerator: str | None = field(default=None, metadata=_EXECUTION)
    devices: int | str | None = field(default=None, metadata=_EXECUTION)
    num_nodes: int | None = field(default=None, metadata=_EXECUTION)
    strategy: str | None = field(default=None, metadata=_EXECUTION)
    precision: Precision | None = None
    max_steps: int | None = None
    max_epochs: int | None = None
    gradient_clip_val: float | None = None
    log_every_n_steps: int | None = field(default=None, metadata=_EXECUTION)
    val_check_interval: float | int | None = field(default=None, metadata=_EXECUTION)
    limit_val_batches: float | int | None = field(default=None, metadata=_EXECUTION)
    logger: dict[str, Any] | bool | None = field(default=None, metadata=_EXECUTION)
    enable_progress_bar: bool | None = field(default=None, metadata=_EXECUTION)
    checkpoint_every_n_steps: int | None = field(default=None, metadata=_EXECUTION)
    keep_checkpoints: int | None = field(default=None, metadata=_EXECUTION)
    num_workers: int | None = field(default=None, metadata=_EXECUTION)


TRAINER_DEFAULTS = TrainerConfig(
    accelerator="auto",
    devices=1,
    num_nodes=1,
    strategy="auto",
    precision="32-true",
    max_steps=-1,
    max_epochs=1,
    gradient_clip_val=1.0,
    log_every_n_steps=10,
    val_check_interval=1.0,
    limit_val_batches=1.0,
    logger=None,
    enable_progress_bar=True,
    checkpoint_every_n_steps=50,
    keep_checkpoints=2,
    num_workers=0,
)


@dataclass(frozen=True)
class SQAEvalConfig:
    """ScienceQA-style evaluation of the student at the end of a stage (as ``mmkd eval`` scores it).

    Args:
        root: ScienceQA-layout folder.
        split: Split to score (keep ``test`` for reports; ``val`` while tuning).
        mode: ``likelihood`` or ``generate``.
        limit: Score only the first N questions.
        batch_size: Questions per batch.
        every_n_steps: Also score every N optimizer steps (0: only at the end).
    """

    root: str
    split: str = "val"
    mode: Literal["likelihood", "generate"] = "likelihood"
    limit: int | None = None
    batch_size: int = 16
    every_n_steps: int = 0


@dataclass(frozen=True)
class StageConfig:
    """One stage of a recipe.

    Args:
        data: Training dataset (``class_path``/``init_args``), e.g. ``mmkd.data.LlavaConversations``.
        val_data: Optional validation dataset.
        task: What the stage computes (``mmkd.tasks.TASKS``): ``distill`` (DPT, SFT, DFT: token objectives),
            ``preference`` (DPO against a frozen reference), ``clip`` (contrastive distillation of CLIP students),
            ... (docs/recipes.md lists them).
        task_args: Arguments of the task's class (checked against its signature at load).
        train: Student parts that train (``vision_tower``, ``projector``, ``language_model``, ``ffn``,
            ``experts``, ``router``; CLIP: ``vision_tower``, ``text_tower``, ``logit_scale``); the rest is frozen.
        objectives: Objective name -> weight; see docs/objectives.md for the names.
        objective_args: Objective name -> constructor arguments (temperature, ...), checked at load.
        optimizer: Optimizer settings.
        schedule: Learning-rate schedule.
        batch_size: Global batch size (all devices, after gradient accumulation).
        micro_batch_size: Per-device batch; default: ``batch_size / (devices * num_nodes)``.
        max_length: Longest tokenised sample; longer ones are truncated on the answer side.
        trainer: Trainer overrides for this stage.
        init_from: Where the student starts: a previous stage's name, a student folder, or ``recipe`` (build
            the recipe's ``student``). Default: the previous stage's result (``recipe`` for the first stage).
        student_transform: Applied to the student after ``init_from``, e.g. ``mmkd.models.UpcycleToMoE``.
        sqa_eval: Score the student on a ScienceQA-layout split when the stage ends (metrics in the manifest).
    """

    data: torch.utils.data.Dataset
    val_data: torch.utils.data.Dataset | None = None
    task: str = "distill"
    task_args: dict[str, Any] = field(default_factory=dict)
    train: list[str] = field(default_factory=list)
    objectives: dict[str, float] = field(default_factory=dict)
    objective_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = 8
    micro_batch_size: int | None = field(default=None, metadata=_EXECUTION)
    max_length: int = 512
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    init_from: str | None = None
    student_transform: Callable[[Any], Any] | None = None
    sqa_eval: SQAEvalConfig | None = None


def _execution_paths(cls: type, prefix: str) -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("execution"):
            paths.append(f"{prefix}{f.name}")
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            paths += _execution_paths(f.default_factory, f"{prefix}{f.name}.")
    return paths


# Keys that change how a run executes, not what it computes: they may differ on resume. The data loader's own
# worker count is a dataset argument, so it is named here.
EXECUTION_KEYS: tuple[str, ...] = (
    "run_dir",
    *_execution_paths(TrainerConfig, "trainer."),
    *_execution_paths(StageConfig, "stages.*."),
    "stages.*.data.init_args.num_workers",
)
