"""Sequence-level KD (Kim & Rush, 2016): the student learns the teacher's own answers to the dataset's prompts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmkd.contract import DistillBatch
from mmkd.objectives import Objective
from mmkd.tasks.base import Collator
from mmkd.tasks.distill import DistillTask
from mmkd.tasks.sequences import answer_batch, trim_answers

__all__ = ["SeqKDTask"]


class SeqKDTask(DistillTask):
    """The teacher answers each prompt of the batch (greedy by default, or sampled), and the stage's token
    objectives train the student on those answers instead of the dataset's: ``lm`` alone is SFT on the teacher's
    answers; a divergence (``kl``, ``jsd``, ...) also matches the teacher's distributions on the same tokens.

    The dataset's answers are never used, so the data may come without them (the collator still needs a turn to
    label: any placeholder answer works). Generation runs under ``no_grad`` with the teacher in eval mode.

    Args:
        objectives: The stage's token objectives by recipe name.
        max_new_tokens: Longest answer the teacher writes.
        do_sample: Sample the answers instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        top_k: Sample among the k most likely tokens (0: all).
    """

    def __init__(self, objectives: dict[str, Objective], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> None:
        super().__init__(objectives)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
        self.max_length: int | None = None  # the stage's, known once the collator is built
        self.generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            self.generation.update(temperature=temperature, top_p=top_p, top_k=top_k)

    @classmethod
    def teacher_needed(cls, objectives: dict[str, type[Objective]], **args: Any) -> bool:
        return True  # the teacher writes the answers

    def collator(self, student: Any, teacher: Any | None, max_length: int) -> Collator:
        from mmkd.data.collate import MultimodalCollator

        self.max_length = max_length
        return MultimodalCollator.for_models(student, teacher, max_length=max_length, prompts=True)

    def losses(self, student: nn.Module, teacher: nn.Module | None, batch: DistillBatch) -> dict[str, Tensor]:
        prompt = batch.teacher_prompt if batch.teacher_prompt is not None else batch.prompt
        with torch.no_grad():
            generated = teacher.generate(prompt, **self.generation)
        answers = trim_answers(generated, teacher.end_token_ids)
        pad = student.tokenizer.pad_token_id
        relabelled, stats = answer_batch(batch, answers, pad, self.max_length,
                                         teacher.tokenizer.pad_token_id)
        terms = super().losses(student, teacher, relabelled)
        device = relabelled.labels.device
        return {**terms, **{k: torch.tensor(v, device=device) for k, v in stats.items()}}
