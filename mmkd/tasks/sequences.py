"""Training sequences from generated answers: what tasks that generate (sequence-level KD, on-policy KD) share.

A model answers a batch's left-padded prompts (``DistillBatch.prompt``); :func:`answer_batch` turns the prompts and
the generated token ids into a labelled :class:`~mmkd.contract.DistillBatch` (right padded, labels on the answer
tokens only), for the student's inputs and, when the batch has them, the teacher's own, which share the vocabulary.

An answer ends at its first end-of-turn token, which is kept and labelled (as the collator labels a dataset's
answers); an answer that reaches ``max_new_tokens`` without one is kept as it is, without an end token, and counted
as hitting the length limit. An answer that would make a sequence longer than the stage's ``max_length`` is cut to
fit (counted as truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mmkd.contract import DistillBatch, ModelInputs

__all__ = ["Answers", "answer_batch", "trim_answers"]

IGNORE_INDEX = -100


@dataclass
class Answers:
    """Generated answers, one token list per row, and what happened to them.

    Attributes:
        tokens: Each row's answer ids, the end token included when there is one.
        hit_limit: Per row: no end token within ``max_new_tokens``.
    """

    tokens: list[list[int]]
    hit_limit: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


def trim_answers(generated: Tensor, eos_ids: int | list[int] | None) -> Answers:
    """Cut each row of ``generate``'s new tokens after its first end token.

    Args:
        generated: ``(B, L_new)`` new token ids, padded after the end (with the pad token, which may be the end token).
        eos_ids: The end-of-turn token id(s); None: no row ends early.

    Returns:
        The answers and which rows hit the length limit.
    """
    ends = set([eos_ids] if isinstance(eos_ids, int) else (eos_ids or []))
    tokens, hit = [], []
    for row in generated.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in ends), None)
        tokens.append(row if cut is None else row[:cut])
        hit.append(cut is None)
    return Answers(tokens, hit)


def _side(prompt: ModelInputs, answers: list[list[int]], pad_id: int, max_length: int | None
          ) -> tuple[ModelInputs, Tensor, list[int]]:
    """One side's right-padded ``prompt + answer`` sequences and labels, and each row's answer length kept."""
    rows, labels, kept = [], [], []
    for b, answer in enumerate(answers):
        ids = prompt.input_ids[b][prompt.attention_mask[b].bool()].tolist()  # the prompt without its left padding
        room = len(answer) if max_length is None else max(0, max_length - len(ids))
        answer = answer[:room]
        rows.append(ids + answer)
        labels.append([IGNORE_INDEX] * len(ids) + answer)
        kept.append(len(answer))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (row, lab) in enumerate(zip(rows, labels)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
        target[b, : len(lab)] = torch.tensor(lab)
    device = prompt.input_ids.device
    return ModelInputs(input_ids.to(device), attention.to(device), prompt.images), target.to(device), kept


def answer_batch(batch: DistillBatch, answers: Answers, pad_id: int, max_length: int | None = None,
                 teacher_pad_id: int | None = None) -> tuple[DistillBatch, dict[str, float]]:
    """The batch's prompts with these answers: a labelled batch for both sides, and counts for the logs.

    Args:
        batch: A training batch with its prompts (``prompt``; ``teacher_prompt`` when the teacher's inputs differ).
        answers: One answer per row (the same ids on both sides: they share a vocabulary).
        pad_id: The student's pad token id.
        max_length: The stage's longest sequence: answers are cut to fit the student's side.
        teacher_pad_id: The teacher's pad token id (default: ``pad_id``).

    Returns:
        The new batch (same images, ids, stand-in flag and data stats) and ``{"gen_length", "gen_hit_limit",
        "gen_truncated"}`` means over the rows.
    """
    if batch.prompt is None:
        raise ValueError("answer_batch needs the batch's prompts: build the collator with prompts=True")
    inputs, labels, kept = _side(batch.prompt, answers.tokens, pad_id, max_length)
    tokens = [a[:k] for a, k in zip(answers.tokens, kept)]  # the teacher sees exactly the answers the student keeps
    teacher_inputs = teacher_labels = None
    if batch.teacher_prompt is not None:
        teacher_inputs, teacher_labels, _ = _side(batch.teacher_prompt, tokens, pad_id if teacher_pad_id is None
                                                  else teacher_pad_id, None)
    rows = max(1, len(tokens))
    stats = {
        "gen_length": sum(answers.lengths) / rows,
        "gen_hit_limit": sum(answers.hit_limit) / rows,
        "gen_truncated": sum(k < n for k, n in zip(kept, answers.lengths)) / rows,
    }
    out = replace(batch, inputs=inputs, labels=labels, teacher_inputs=teacher_inputs, teacher_labels=teacher_labels)
    return out, stats
