"""Preference distillation: DPO on chosen/rejected answer pairs against a frozen reference (LLaVA-MoD)."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmkd.contract import AUX_LOSS, DistillBatch, PreferenceBatch
from mmkd.objectives import Objective, answer_logprobs
from mmkd.tasks.base import Collator, ObjectiveTask
from mmkd.tasks.distill import check_cache_objectives

__all__ = ["PreferenceTask"]


class PreferenceTask(ObjectiveTask):
    """DPO with the teacher (LLaVA-MoD) or the stage's starting student as the reference model.

    The stage names exactly one preference objective (``dpo``) and optionally token objectives, computed on the
    chosen answers (``lm``: the NLL of the chosen answer, a common regulariser; a distillation objective compares
    with the teacher there). An MoE student's router loss is the mean over the chosen and the rejected passes
    (LLaVA-MoD adds both: with twice its coefficient this is the same sum).

    Reference log-probabilities are computed under ``no_grad`` by a frozen model that is neither a submodule nor in
    the optimizer or the checkpoint; ``initial_student`` is a frozen copy taken when the stage is built (on resume
    the runner rebuilds the stage's starting student first, so the copy is the same). With ``teacher_cache`` the
    teacher's log-probabilities of both answers come from the cache ``mmkd cache`` wrote for this stage and no
    reference model is loaded; every pair of the dataset is looked up before training.

    Args:
        objectives: The stage's objectives by recipe name.
        reference: ``teacher``, ``initial_student``, or ``base_adapters_off`` (a LoRA student's base with its
            adapters disabled: the starting student without a second copy; every trained part must be adapted).
        average: Length-averaged log-probabilities; None: only for the ``ipo`` loss, which expects them.
        teacher_cache: A teacher cache folder holding the teacher's answer log-probabilities (``reference:
            teacher`` only), or None for the live teacher.
        on_missing: A pair without an entry in the cache: ``error`` (before training) or ``skip`` it.
    """

    accepts = ("preference", "tokens")
    requires = ("preference",)

    def __init__(self, objectives: dict[str, Objective],
                 reference: Literal["teacher", "initial_student", "base_adapters_off"] = "teacher",
                 average: bool | None = None, teacher_cache: str | None = None,
                 on_missing: Literal["error", "skip"] = "error") -> None:
        super().__init__(objectives)
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing={on_missing!r}: expected 'error' or 'skip'")
        if teacher_cache is not None:
            if reference != "teacher":
                raise ValueError(f"teacher_cache holds the teacher's log-probabilities; reference={reference!r} "
                                 "reads another model (set reference: teacher, or drop teacher_cache)")
            check_cache_objectives({n: o for n, o in self.objectives.items() if o.reads == "tokens"},
                                   "of preference pairs takes teacher-free token objectives (lm)")
        self.teacher_cache = teacher_cache
        self.on_missing = on_missing
        preference = self.of_family("preference")
        if len(preference) != 1:
            raise ValueError(f"a preference stage takes exactly one preference objective, got {sorted(preference)}")
        (self.preference_name, self.preference), = preference.items()
        self.tokens = self.of_family("tokens")
        self.reference_kind = reference
        self.average = bool(average) if average is not None else getattr(self.preference, "loss_type", "") == "ipo"
        self.reference: nn.Module | None = None

    @classmethod
    def teacher_needed(cls, objectives: dict[str, type[Objective]], reference: str = "teacher",
                       teacher_cache: str | None = None, **args: Any) -> bool:
        if teacher_cache is not None:
            return False
        tokens = [o for o in objectives.values() if o.reads == "tokens"]
        return reference == "teacher" or any(o.needs_teacher for o in tokens)

    @classmethod
    def teacher_inputs_needed(cls, objectives: dict[str, type[Objective]], teacher_cache: str | None = None,
                              **args: Any) -> bool:
        return teacher_cache is not None

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_needed({n: type(o) for n, o in self.objectives.items()}, self.reference_kind,
                                   self.teacher_cache)

    def prepare(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if self.reference_kind == "base_adapters_off":  # a LoRA student's base: no second copy of the model
            from mmkd.models.lora import AdaptersOff

            self.reference = AdaptersOff(student)
        elif self.reference_kind == "initial_student":
            reference = copy.deepcopy(student)
            if hasattr(reference, "freeze"):
                reference.freeze()
            else:
                reference.eval().requires_grad_(False)
            self.reference = reference

    def frozen_models(self) -> dict[str, nn.Module]:
        return {"reference": self.reference} if self.reference is not None else {}

    def key_collator(self, student: Any, teacher: Any, max_length: int) -> Collator:
        """The collator whose batches carry each pair's cache key (what ``mmkd cache`` and the join use)."""
        from mmkd.data.collate import PreferenceCollator

        return PreferenceCollator.for_models(student, teacher, max_length=max_length, keys=True)

    def cache_batching(self, max_length: int) -> dict[str, Any]:
        """The collator settings that decide the keys, recorded in the cache header."""
        return {"max_length": int(max_length)}

    def collator(self, student: Any, teacher: Any | None, max_length: int) -> Collator:
        from mmkd.data.collate import PreferenceCollator

        if self.teacher_cache is not None:
            from mmkd.cache.join import STORED_SEQUENCE, CachedTeacher, CacheJoin

            self.cached = CachedTeacher(self.teacher_cache, teacher, k=None, stored=STORED_SEQUENCE,
                                        batching=self.cache_batching(max_length))
            return CacheJoin(self.key_collator(student, teacher, max_length), self.cached)
        return PreferenceCollator.for_models(student, teacher if self.needs_teacher else None, max_length=max_length)

    def _reference_pass(self, teacher: nn.Module | None, side: DistillBatch) -> tuple[Any, Tensor]:
        """The reference model's output and labels on one answer side (the teacher reads its own inputs)."""
        if self.reference_kind == "teacher":
            inputs, labels = side.teacher_side()
            return teacher(**inputs.kwargs()), labels
        return self.reference(**side.inputs.kwargs()), side.labels

    def losses(self, student: nn.Module, teacher: nn.Module | None, batch: PreferenceBatch) -> dict[str, Tensor]:
        hidden = any(o.needs_hidden_states for o in self.tokens.values())
        sides = {"chosen": batch.chosen, "rejected": batch.rejected}
        outs = {name: student(**side.inputs.kwargs(), output_hidden_states=hidden and name == "chosen")
                for name, side in sides.items()}
        policy = {name: answer_logprobs(outs[name], side.labels, self.average) for name, side in sides.items()}
        reference_outs = {}
        if self.teacher_cache is not None:  # the teacher's summed answer log-probs, from the cache
            reference = {name: _cached_reference(side, self.average) for name, side in sides.items()}
        else:
            with torch.no_grad():
                reference_outs = {name: self._reference_pass(teacher, side) for name, side in sides.items()}
                reference = {name: answer_logprobs(out, labels, self.average)
                             for name, (out, labels) in reference_outs.items()}
        loss, metrics = self.preference(policy["chosen"], policy["rejected"], reference["chosen"],
                                        reference["rejected"])
        name = self.preference_name
        terms: dict[str, Tensor] = {name: loss, **{f"{name}_{k}": v for k, v in metrics.items()}}
        teacher_chosen = None
        if any(o.needs_teacher for o in self.tokens.values()):
            if self.reference_kind == "teacher" and not hidden:
                teacher_chosen = reference_outs["chosen"][0]
            else:
                with torch.no_grad():
                    teacher_chosen = teacher(**batch.chosen.teacher_side()[0].kwargs(), output_hidden_states=hidden)
        for token_name, objective in self.tokens.items():
            terms.update(self.objective_terms(token_name, objective(outs["chosen"], teacher_chosen, batch.chosen)))
        aux = [out.aux_loss for out in outs.values() if out.aux_loss is not None]
        if aux:  # the router loss of both passes (LLaVA-MoD adds the rejected pass's too), as their mean
            terms[AUX_LOSS] = sum(aux) / len(aux)
        return terms


def _cached_reference(side: DistillBatch, average: bool) -> Tensor:
    """The teacher's answer log-probabilities of one side from the cache, ``(B,)`` float32 (length-averaged like
    :func:`mmkd.objectives.answer_logprobs` when ``average``)."""
    labels = side.teacher_side()[1]
    values = side.teacher_logprobs.to(labels.device, torch.float32)
    if average:
        values = values / (labels[:, 1:] != -100).sum(1).clamp(min=1)
    return values
