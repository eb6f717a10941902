"""Objectives by recipe name: typed classes over the output contract, bound to their signatures at recipe load.

A recipe names objectives with weights (``objectives: {lm: 1.0, mdist: 1.0}``) and their constructor arguments
(``objective_args: {mdist: {temperature: 2.0}}``). :data:`OBJECTIVES` is the one table from names to classes; what
each one reads and needs is declared on its class (:class:`~mmkd.objectives.base.Objective`). A new objective is a
class and one line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmkd.objectives.base import Objective, answer_positions, answer_targets, check_counts
from mmkd.objectives.clip import CLIPKDObjective
from mmkd.objectives.llava_kd import MDistObjective, RDistObjective
from mmkd.objectives.preference import DPOObjective, answer_logprobs
from mmkd.objectives.tokens import (
    FeatureObjective,
    ForwardKLObjective,
    JSDObjective,
    LanguageModeling,
    ReverseKLObjective,
    SkewKLObjective,
    SkewReverseKLObjective,
    TAIDObjective,
    TokenDivergenceObjective,
    TopKKLObjective,
    TotalVariationObjective,
)

__all__ = [
    "OBJECTIVES",
    "CLIPKDObjective",
    "DPOObjective",
    "FeatureObjective",
    "ForwardKLObjective",
    "JSDObjective",
    "LanguageModeling",
    "MDistObjective",
    "Objective",
    "RDistObjective",
    "ReverseKLObjective",
    "SkewKLObjective",
    "SkewReverseKLObjective",
    "TAIDObjective",
    "TokenDivergenceObjective",
    "TopKKLObjective",
    "TotalVariationObjective",
    "answer_logprobs",
    "answer_positions",
    "answer_targets",
    "build_objective",
    "check_counts",
    "context_value",
]

OBJECTIVES: dict[str, type[Objective]] = {
    "lm": LanguageModeling,
    "kl": ForwardKLObjective,
    "fkl": ForwardKLObjective,
    "rkl": ReverseKLObjective,
    "jsd": JSDObjective,
    "tvd": TotalVariationObjective,
    "skl": SkewKLObjective,
    "srkl": SkewReverseKLObjective,
    "taid": TAIDObjective,
    "topk_kl": TopKKLObjective,
    "mdist": MDistObjective,
    "rdist": RDistObjective,
    "feature": FeatureObjective,
    "dpo": DPOObjective,
    "clip_kd": CLIPKDObjective,
}


def context_value(source: str, *, student: Any = None, teacher: Any = None, total_steps: int | None = None) -> Any:
    """The value of a context source (``"total_steps"``, ``"student.hidden_size"``, ``"teacher.embed_dim"``)."""
    if source == "total_steps":
        return total_steps
    role, _, attr = source.partition(".")
    model = {"student": student, "teacher": teacher}[role]
    if model is None:
        raise ValueError(f"{source}: the stage has no {role} to read it from; set it in objective_args")
    return getattr(model, attr)


def build_objective(name: str, args: Mapping[str, Any] | None = None, *, student: Any = None, teacher: Any = None,
                    total_steps: int | None = None) -> Objective:
    """The objective of a recipe name, with its arguments and the stage's context filled in.

    Args:
        name: A key of :data:`OBJECTIVES`.
        args: The recipe's ``objective_args`` for it (already checked against the signature at load).
        student: The stage's student (for ``student.*`` context).
        teacher: The stage's teacher, or None.
        total_steps: The stage's optimizer steps.
    """
    cls = OBJECTIVES[name]
    kwargs = dict(args or {})
    for arg, source in cls.context.items():
        if kwargs.get(arg) is None:
            kwargs[arg] = context_value(source, student=student, teacher=teacher, total_steps=total_steps)
    return cls(**kwargs)
