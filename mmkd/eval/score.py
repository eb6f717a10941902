"""Score an answer file against an answer key, the way ``mmkd eval score`` does."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmkd.eval.answer_key import AnswerKey
from mmkd.eval.answers import read_answers
from mmkd.eval.metric import ScienceQAAccuracy


def score_answers(answers: Mapping[str, str], key: AnswerKey) -> dict[str, Any]:
    """Score answer texts against every question of a key.

    Args:
        answers: ``{question_id: text}``; questions of the key without an entry count as missing (wrong),
            entries naming no question of the key are ignored (see ``unmatched_answers``).
        key: The questions and right answers.

    Returns:
        The ``metrics.json`` structure (``ScienceQAAccuracy.report``): LLaVA's scores, and lmms-eval's exact match
        of the same answers under ``exact_match``.
    """
    metric = ScienceQAAccuracy(categories=key.categories, sync_on_compute=False)
    metric.update([answers.get(q.question_id) for q in key.questions], list(key.questions))
    return metric.report()


def unmatched_answers(answers: Mapping[str, str], key: AnswerKey) -> list[str]:
    """The question ids of answers that name no question of the key (scoring ignores them).

    Args:
        answers: ``{question_id: text}``.
        key: The questions.

    Returns:
        Those ids, in answer-file order.
    """
    known = {q.question_id for q in key.questions}
    return [qid for qid in answers if qid not in known]


def score_answer_file(path: str | Path, key: AnswerKey) -> dict[str, Any]:
    """Score a LLaVA answer file (``question_id`` and ``text`` per line) against a key.

    Args:
        path: The answer file.
        key: The questions and right answers (``load_scienceqa_key`` or ``load_question_file_key``).

    Returns:
        As ``score_answers``.
    """
    return score_answers(read_answers(path), key)
