"""Distillation (DPT, SFT, DFT): a weighted sum of token objectives on labelled image-text sequences."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmkd.contract import AUX_LOSS, DistillBatch
from mmkd.objectives import Objective
from mmkd.tasks.base import Collator, ObjectiveTask

__all__ = ["DistillTask", "check_cache_objectives"]


def check_cache_objectives(objectives: Mapping[str, Objective], what: str) -> None:
    """A stage that reads a teacher cache computes only objectives that read it, and teacher-free ones."""
    live = [name for name, o in objectives.items() if o.needs_teacher and not o.reads_cache]
    if live:
        raise ValueError(f"teacher_cache: objective {live[0]} needs the live teacher; a stage that reads a teacher "
                         f"cache {what}")


class DistillTask(ObjectiveTask):
    """The student's (and, for distillation objectives, the frozen teacher's) forward pass over the dataset's
    sequences, and every objective on their outputs.

    With only teacher-free objectives (``lm``) this is supervised fine-tuning and the teacher is not loaded. With
    ``teacher_cache`` the teacher is not loaded either: its top-k at the answer positions comes from the cache that
    ``mmkd cache`` wrote for this stage (``topk_kl``), each batch joined with its records by content key. Every record
    of the dataset is looked up before training.

    Args:
        objectives: The stage's token objectives by recipe name.
        on_overflow: A sample longer than the stage's ``max_length``: ``truncate`` its answer or ``skip`` it.
        teacher_cache: A teacher cache folder to read the teacher from, or None for the live teacher.
        on_missing: A record without an entry in the cache: ``error`` (before training) or ``skip`` it (counted in
            the manifest).
    """

    accepts = ("tokens",)

    def __init__(self, objectives: dict[str, Objective], on_overflow: Literal["truncate", "skip"] = "truncate",
                 teacher_cache: str | None = None, on_missing: Literal["error", "skip"] = "error"):
        super().__init__(objectives)
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing={on_missing!r}: expected 'error' or 'skip'")
        self.on_overflow = on_overflow
        self.teacher_cache = teacher_cache
        self.on_missing = on_missing
        if teacher_cache is not None:
            check_cache_objectives(self.objectives, "takes topk_kl and teacher-free objectives")
            readers = [name for name, o in self.objectives.items() if o.reads_cache]
            if not readers:
                raise ValueError("teacher_cache is set but no objective reads it (add topk_kl)")
            ks = {o.k for o in self.objectives.values() if o.reads_cache and getattr(o, "k", None) is not None}
            if len(ks) > 1:
                raise ValueError(f"teacher_cache: the objectives ask for different k ({sorted(ks)}); a cache has one")
            self.k = next(iter(ks), None)

    @classmethod
    def teacher_needed(cls, objectives: Mapping[str, type[Objective]], teacher_cache: str | None = None,
                       **args: Any) -> bool:
        return teacher_cache is None and any(o.needs_teacher for o in objectives.values())

    @classmethod
    def teacher_inputs_needed(cls, objectives: Mapping[str, type[Objective]], teacher_cache: str | None = None,
                              **args: Any) -> bool:
        return teacher_cache is not None

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_needed({n: type(o) for n, o in self.objectives.items()}, teacher_cache=self.teacher_cache)

    def key_collator(self, student: Any, teacher: Any, max_length: int) -> Collator:
        """The collator whose batches carry each sample's cache key (what ``mmkd cache`` and the join use)."""
        from mmkd.data.collate import MultimodalCollator

        return MultimodalCollator.for_models(student, teacher, max_length=max_length, on_overflow=self.on_overflow,
                                             keys=True)

    def cache_batching(self, max_length: int) -> dict[str, Any]:
        """The collator settings that decide the keys, recorded in the cache header."""
        return {"max_length": int(max_length), "on_overflow": self.on_overflow}

    def collator(self, student: Any, teacher: Any | None, max_length: int) -> Collator:
        from mmkd.data.collate import MultimodalCollator

        if self.teacher_cache is not None:
            from mmkd.cache.join import STORED_ANSWER, CachedTeacher, CacheJoin

            self.cached = CachedTeacher(self.teacher_cache, teacher, k=self.k, stored=STORED_ANSWER,
                                        batching=self.cache_batching(max_length))
            return CacheJoin(self.key_collator(student, teacher, max_length), self.cached)
        return MultimodalCollator.for_models(student, teacher if self.needs_teacher else None, max_length=max_length,
                                             on_overflow=self.on_overflow)

    def losses(self, student: nn.Module, teacher: nn.Module | None, batch: DistillBatch) -> dict[str, Tensor]:
        hidden = any(o.needs_hidden_states for o in self.objectives.values())
        student_out = student(**batch.inputs.kwargs(), output_hidden_states=hidden)
        teacher_out = None
        if teacher is not None and any(o.needs_teacher for o in self.objectives.values()):
            with torch.no_grad():
                teacher_out = teacher(**batch.teacher_side()[0].kwargs(), output_hidden_states=hidden)
        terms = self.token_terms(student_out, teacher_out, batch)
        if student_out.aux_loss is not None:
            terms[AUX_LOSS] = student_out.aux_loss
        return terms
