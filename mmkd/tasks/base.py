"""What a task is: the unit of extension, one kind of stage.

A task says what one stage computes: which batches its collator builds, which named loss terms a batch gives, and
which objectives it can weigh. It is a small class typed by its ``__init__`` (its recipe ``task_args``), built for a
stage with that stage's objectives. The one Lightning module (``mmkd.train.stage_module.StageModule``) does
everything every stage shares — freezing, optimizer, schedule, the weighted sum, the stand-in batch, finiteness,
global-batch means, logging, RNG — and asks the task only for what is specific to it.

Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from mmkd.objectives import Objective

__all__ = ["Collator", "ObjectiveTask", "Task"]

Collator = Callable[[list[Any]], Any]


@runtime_checkable
class Task(Protocol):
    """The interface of a kind of stage (see the module docstring).

    Attributes:
        accepts: The objective families (``Objective.reads``) the task computes.
        requires: Families of which the stage must name exactly one objective.
        needs_teacher: Whether the stage loads the recipe's teacher (False: it is released, or never loaded).
        objectives: The stage's objectives by recipe name (a submodule of the stage: trained and checkpointed).
    """

    accepts: ClassVar[tuple[str, ...]]
    requires: ClassVar[tuple[str, ...]]
    needs_teacher: bool
    objectives: nn.ModuleDict

    @classmethod
    def teacher_needed(cls, objectives: Mapping[str, type[Objective]], **args: Any) -> bool:
        """Whether a stage with these objective classes and task arguments needs the teacher (at recipe load)."""
        ...

    @classmethod
    def teacher_inputs_needed(cls, objectives: Mapping[str, type[Objective]], **args: Any) -> bool:
        """Whether the stage builds the teacher's inputs without the teacher (a stage that reads a teacher cache):
        its collator then gets the teacher's input side (``mmkd.models.ImageTextInputs``) as ``teacher``."""
        ...

    def prepare(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once the stage's models exist, before training (e.g. to copy the starting student)."""
        ...

    def select_data(self, dataset: Any, collator: Collator, num_workers: int = 0) -> tuple[Any, dict[str, Any]]:
        """Checked before training: the dataset the stage trains on (e.g. without records a teacher cache lacks),
        and what the check counted (recorded in the manifest's ``data``)."""
        ...

    def collator(self, student: Any, teacher: Any | None, max_length: int) -> Collator:
        """Records -> the batches this task's ``losses`` takes."""
        ...

    def losses(self, student: nn.Module, teacher: nn.Module | None, batch: Any) -> dict[str, Tensor]:
        """Named scalar terms of one micro-batch: every objective's (the stage weighs them by the recipe's
        weights), the model's own ``aux`` loss if any (added as it is), and terms logged only."""
        ...

    def frozen_models(self) -> dict[str, nn.Module]:
        """Frozen models of the task's own besides the teacher (a reference copy): placed like the teacher."""
        ...

    def bind_weights(self, weights: Mapping[str, float]) -> None:
        """The stage's recipe weights, given once by the stage (a task may fuse objectives' passes with them)."""
        ...

    def on_micro_batch(self, global_step: int, micro: int) -> None:
        """Before each training micro-batch: the optimizer step it belongs to and its index within that step on this
        rank (the same on every rank, and again after a resume: draws seeded by them repeat exactly)."""
        ...

    def on_optimizer_step(self, means: Mapping[str, Tensor]) -> dict[str, float]:
        """Once per optimizer step with each term's mean over the global batch: schedules (TAID). Returns values
        to log (``train/<key>``)."""
        ...

    def after_optimizer_step(self, student: nn.Module) -> None:
        """After each optimizer step (e.g. clamping a logit scale)."""
        ...


class ObjectiveTask:
    """Shared defaults of the tasks: the stage's objectives, teacher need derived from them, schedule hooks.

    Args:
        objectives: The stage's objectives by recipe name.
    """

    accepts: ClassVar[tuple[str, ...]] = ("tokens",)
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, objectives: Mapping[str, Objective]) -> None:
        self.objectives = nn.ModuleDict(dict(objectives))
        self.weights: dict[str, float] | None = None
        # A teacher cache the collator joins (mmkd.cache.CachedTeacher), set by tasks that read one, and what to do
        # with records it lacks.
        self.cached: Any = None
        self.on_missing = "error"

    def bind_weights(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)

    def on_micro_batch(self, global_step: int, micro: int) -> None:
        return None

    def token_terms(self, student_out: Any, teacher_out: Any, batch: Any,
                    objectives: Mapping[str, Objective] | None = None) -> dict[str, Tensor]:
        """Every token objective's term (and extras) on one labelled batch, in recipe order.

        Objectives that read the student's logits at the same answer positions (``head_term``: ``lm``, the token
        divergences, ``topk_kl``) share one pass over the student's LM head when there are two or more of them and
        the stage's weights are bound; the gradient of their weighted sum is then carried by
        :data:`mmkd.contract.HEAD_GRADIENT`.
        """
        from mmkd.contract import HEAD_GRADIENT
        from mmkd.objectives.head import fused_head_terms

        objectives = self.objectives if objectives is None else objectives
        fused: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        shared = [n for n, o in objectives.items() if hasattr(o, "head_term") and getattr(o, "fusable", True)
                  and (o.needs_teacher is False or teacher_out is not None or getattr(o, "reads_cache", False))]
        if self.weights is not None and len(shared) >= 2 and all(n in self.weights for n in shared):
            heads = {n: objectives[n].head_term(student_out, teacher_out, batch) for n in shared}
            fused, carrier = fused_head_terms(student_out, heads, self.weights)
            terms[HEAD_GRADIENT] = carrier
        for name, objective in objectives.items():
            if name in fused:
                terms[name] = fused[name]
            else:
                terms.update(self.objective_terms(name, objective(student_out, teacher_out, batch)))
        return terms

    @classmethod
    def teacher_needed(cls, objectives: Mapping[str, type[Objective]], **args: Any) -> bool:
        """Whether a stage of this task with these objective classes and task arguments needs the teacher (asked
        when the recipe loads, before anything is built)."""
        return any(o.needs_teacher for o in objectives.values())

    @classmethod
    def teacher_inputs_needed(cls, objectives: Mapping[str, type[Objective]], **args: Any) -> bool:
        return False

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_needed({n: type(o) for n, o in self.objectives.items()})

    def select_data(self, dataset: Any, collator: Collator, num_workers: int = 0) -> tuple[Any, dict[str, Any]]:
        if self.cached is None:
            return dataset, {}
        dataset, selection = self.cached.check(dataset, collator, on_missing=self.on_missing,
                                               num_workers=num_workers)
        return dataset, {"teacher_cache": selection.as_dict()}

    def of_family(self, family: str) -> dict[str, Objective]:
        """The stage's objectives that read ``family``, in recipe order."""
        return {name: o for name, o in self.objectives.items() if o.reads == family}

    def prepare(self, student: nn.Module, teacher: nn.Module | None) -> None:
        return None

    def frozen_models(self) -> dict[str, nn.Module]:
        return {}

    def objective_terms(self, name: str, value: Tensor) -> dict[str, Tensor]:
        """An objective's term and its extras (``<name>_<key>``), as a task's ``losses`` returns them."""
        return {name: value, **{f"{name}_{k}": v for k, v in self.objectives[name].extras().items()}}

    def on_optimizer_step(self, means: Mapping[str, Tensor]) -> dict[str, float]:
        logged: dict[str, float] = {}
        for name, objective in self.objectives.items():
            if name in means:
                extras = {k[len(name) + 1:]: v for k, v in means.items() if k.startswith(f"{name}_")}
                for key, value in objective.on_optimizer_step(means[name], extras).items():
                    logged[f"{name}_{key}"] = value
        return logged

    def after_optimizer_step(self, student: nn.Module) -> None:
        return None
