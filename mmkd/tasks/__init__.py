"""Kinds of stage by recipe name: one file per task, one line per task in :data:`TASKS`.

A stage names its task (``task: distill``, the default) and the task's arguments (``task_args``), which are bound to
the task's ``__init__`` when the recipe loads. See :mod:`mmkd.tasks.base` for what a task is and docs/extending.md
for adding one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmkd.objectives import Objective
from mmkd.tasks.base import Collator, ObjectiveTask, Task
from mmkd.tasks.clip import CLIPTask
from mmkd.tasks.distill import DistillTask
from mmkd.tasks.gkd import OnPolicyTask
from mmkd.tasks.preference import PreferenceTask
from mmkd.tasks.seq_kd import SeqKDTask

__all__ = ["TASKS", "CLIPTask", "Collator", "DistillTask", "ObjectiveTask", "OnPolicyTask", "PreferenceTask",
           "SeqKDTask", "Task", "build_task"]

TASKS: dict[str, type[Task]] = {
    "distill": DistillTask,
    "preference": PreferenceTask,
    "clip": CLIPTask,
    "seq_kd": SeqKDTask,
    "gkd": OnPolicyTask,
}


def build_task(name: str, args: Mapping[str, Any] | None, objectives: Mapping[str, Objective], *,
               student: Any = None, teacher: Any = None) -> Task:
    """The task of a recipe name with its arguments and the stage's objectives, prepared for its models.

    Args:
        name: A key of :data:`TASKS`.
        args: The stage's ``task_args`` (checked against the signature at load).
        objectives: The stage's objectives by recipe name, in recipe order.
        student: The stage's starting student (tasks that copy it, e.g. a reference, do so here).
        teacher: The stage's teacher, or None.
    """
    task = TASKS[name](dict(objectives), **dict(args or {}))
    task.prepare(student, teacher)
    return task
