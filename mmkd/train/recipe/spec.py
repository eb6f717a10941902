"""Resolved, frozen stage specifications: what everything below the runner receives instead of the recipe."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from mmkd.train.recipe.schema import OptimizerConfig, ScheduleConfig, SQAEvalConfig, TrainerConfig

__all__ = ["ComponentSpec", "ObjectiveSpec", "StageSpec", "device_count", "import_path"]


def import_path(path: str) -> Any:
    """The object a dotted path names (``torch.optim.AdamW``)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path")
    return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class ComponentSpec:
    """A component of the recipe given as ``class_path`` / ``init_args`` (jsonargparse's convention).

    Attributes:
        class_path: The dotted path of the class.
        init_args: Its constructor arguments.
    """

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> ComponentSpec | None:
        """From a recipe value (a mapping with ``class_path``), or None."""
        if value is None:
            return None
        return cls(str(value["class_path"]), dict(value.get("init_args") or {}))

    def target(self) -> Any:
        """The class itself (imported)."""
        return import_path(self.class_path)

    def build(self) -> Any:
        """An instance: ``class(**init_args)``."""
        return self.target()(**self.init_args)


@dataclass(frozen=True)
class ObjectiveSpec:
    """One weighted objective of a stage.

    Attributes:
        name: The recipe name (a key of ``mmkd.objectives.OBJECTIVES``).
        weight: Its weight in the stage's loss.
        args: Its ``objective_args``.
    """

    name: str
    weight: float
    args: dict[str, Any] = field(default_factory=dict)


def device_count(devices: int | str | None) -> int:
    """Processes per node that a Trainer ``devices`` value asks for (1 for ``auto``)."""
    if devices in (None, "auto"):
        return 1
    if isinstance(devices, str):
        devices = devices.strip()
        if devices.startswith("[") or "," in devices:
            return len([d for d in devices.strip("[]").split(",") if d.strip()])
        return 1 if devices == "-1" else int(devices)
    return max(1, int(devices))


@dataclass(frozen=True)
class StageSpec:
    """One stage, resolved: defaults filled, trainer settings merged, batch arithmetic done, names checked.

    Attributes:
        name: The stage name.
        index: Its position in the recipe.
        seed: The recipe's seed.
        task: The task's name (``mmkd.tasks.TASKS``).
        task_args: The task's arguments.
        objectives: The weighted objectives, in recipe order.
        data: The training dataset.
        val_data: The validation dataset, or None.
        train: The student parts that train.
        optimizer: Optimizer settings.
        schedule: Schedule settings.
        batch_size: Global batch.
        micro_batch_size: Per-device batch.
        accumulate: Gradient accumulation steps.
        world_size: Devices times nodes.
        max_length: Longest tokenised sample.
        trainer: The recipe's trainer settings with this stage's overrides and the defaults.
        init_from: ``recipe``, a stage name, or a student folder.
        student_transform: Applied to the student after ``init_from``, or None.
        sqa_eval: End-of-stage evaluation, or None.
        needs_teacher: Whether the stage's task needs the recipe's teacher.
        needs_teacher_inputs: Whether it builds the teacher's inputs without loading the teacher (a teacher cache).
    """

    name: str
    index: int
    seed: int
    task: str
    task_args: dict[str, Any]
    objectives: tuple[ObjectiveSpec, ...]
    data: ComponentSpec
    val_data: ComponentSpec | None
    train: tuple[str, ...]
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    batch_size: int
    micro_batch_size: int
    accumulate: int
    world_size: int
    max_length: int
    trainer: TrainerConfig
    init_from: str
    student_transform: ComponentSpec | None
    sqa_eval: SQAEvalConfig | None
    needs_teacher: bool
    needs_teacher_inputs: bool = False

    @property
    def weights(self) -> dict[str, float]:
        """Objective name -> weight, in recipe order."""
        return {o.name: o.weight for o in self.objectives}

    def total_steps(self, n_samples: int) -> int:
        """Optimizer steps of the stage: ``max_steps`` when set, else whole global batches times epochs."""
        if self.trainer.max_steps is not None and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        per_epoch = n_samples // self.batch_size
        if per_epoch < 1:
            raise ValueError(
                f"stages.{self.name}.data: {n_samples} samples make no full global batch of {self.batch_size}"
            )
        return per_epoch * int(self.trainer.max_epochs or 1)
