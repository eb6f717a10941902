"""The right answers a scorer needs: from ScienceQA's ``problems.json`` or from a LLaVA question file.

Reading these needs no images and no ``mmkd.data``: ``mmkd eval score`` works on a bare answer file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.eval.categories import (
    CATEGORIES,
    PROMPT_CATEGORIES,
    problem_categories,
    prompt_categories,
    record_categories,
)
from mmkd.eval.parsing import OPTION_LETTERS, parse_answer

_OPTION_LINE = re.compile(r"^([A-Z])\. ")


@dataclass(frozen=True)
class KeyedQuestion:
    """One question's right answer and what it is reported under.

    Attributes:
        question_id: The id an answer line names (ScienceQA's pid; a string).
        answer: The right letter, ``"A"``-``"E"``.
        num_choices: How many choices the question offers.
        categories: The categories it counts in (subset of ``CATEGORIES``).
    """

    question_id: str
    answer: str
    num_choices: int
    categories: frozenset[str]


@dataclass(frozen=True)
class AnswerKey:
    """The questions of one split, in order, and which categories their source determines.

    Attributes:
        questions: The questions, in file order.
        categories: The categories the source determines: all of ``CATEGORIES`` from ``problems.json``,
            only ``PROMPT_CATEGORIES`` from a LLaVA question file.
        source: Where they were read from, for messages.
    """

    questions: tuple[KeyedQuestion, ...]
    categories: tuple[str, ...]
    source: str


def _read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); expected {what}") from None


def load_scienceqa_key(root: str | Path, split: str = "test") -> AnswerKey:
    """The answer key of one split of a ScienceQA folder (``problems.json`` and ``pid_splits.json``).

    Args:
        root: The folder holding ``problems.json`` and ``pid_splits.json``.
        split: A key of ``pid_splits.json`` (``train``, ``val``, ``test``, ``minitest``, ...).

    Returns:
        The split's questions in ``pid_splits.json`` order, with every category.
    """
    root = Path(root)
    problems = _read_json(root / "problems.json", "ScienceQA's problems.json: pid -> problem")
    splits = _read_json(root / "pid_splits.json", "ScienceQA's pid_splits.json: split -> list of pids")
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ValueError(f"{root}: problems.json and pid_splits.json must each hold a JSON object")
    if split not in splits:
        raise ValueError(f"{root / 'pid_splits.json'}: no split {split!r}; it has {sorted(splits)}")
    questions = []
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise ValueError(f"{root / 'problems.json'}: no problem {pid!r}, listed in split {split!r}")
        problem = problems[pid]
        try:
            choices, answer = problem["choices"], int(problem["answer"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{root / 'problems.json'}: problem {pid!r} needs 'choices' and an 'answer' index")
        if not 0 <= answer < min(len(choices), len(OPTION_LETTERS)):
            raise ValueError(
                f"{root / 'problems.json'}: problem {pid!r} has answer {answer}, expected an index into its "
                f"{len(choices)} choices (at most {len(OPTION_LETTERS)})"
            )
        categories = problem_categories(
            str(problem.get("subject", "")),
            str(problem.get("grade", "")),
            problem.get("hint") or "",
            bool(problem.get("image")),
        )
        questions.append(KeyedQuestion(pid, OPTION_LETTERS[answer], len(choices), categories))
    return AnswerKey(tuple(questions), CATEGORIES, f"{root} ({split})")


def count_options(prompt: str) -> int:
    """How many lettered options (``A. ...``, ``B. ...``) a LLaVA ScienceQA prompt lists.

    Counts the lines that start ``A. ``, ``B. ``, ... in letter order after the last ``A. `` line; other
    lines in between are an option's text running over a line break (``A. See you soon,\nJanet``).

    Args:
        prompt: The human turn of a question-file entry.

    Returns:
        The number of options, 0 if there is no ``A. `` line.
    """
    run = 0
    for line in prompt.split("\n"):
        match = _OPTION_LINE.match(line)
        if match is None:
            continue
        if match.group(1) == "A":
            run = 1
        elif run and match.group(1) == chr(ord("A") + run):
            run += 1
    return run


def load_question_file_key(path: str | Path) -> AnswerKey:
    """The answer key of a LLaVA ScienceQA question file (e.g. ``llava_test_CQM-A.json``).

    Each entry is ``{"id", "image"?, "conversations": [{"from": "human", "value": prompt},
    {"from": "gpt", "value": answer}]}``; the answer is a bare letter, or a text that names one the way
    answers are parsed (``"... The answer is B."``, as older question files write it).

    Args:
        path: The question file.

    Returns:
        Its questions in file order; categories IMG, TXT and NO only.
    """
    path = Path(path)
    entries = _read_json(path, "a LLaVA question file: a list of {id, conversations}")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, conversations}} entries")
    questions = []
    for i, entry in enumerate(entries):
        try:
            qid = str(entry["id"])
            prompt = entry["conversations"][0]["value"]
            gold = entry["conversations"][1]["value"].strip()
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{path}: entry {i} needs 'id' and two 'conversations' turns (prompt, answer)")
        letter = parse_answer(gold)
        num_choices = count_options(prompt)
        if letter is None or letter not in OPTION_LETTERS[:num_choices]:
            raise ValueError(
                f"{path}: entry {qid!r} answers {gold[:40]!r}, expected one of its {num_choices} option letters"
            )
        categories = prompt_categories(prompt)
        if "image" in entry and entry["image"]:
            categories = (categories - {"NO"}) | {"IMG"}
        questions.append(KeyedQuestion(qid, letter, num_choices, categories))
    return AnswerKey(tuple(questions), PROMPT_CATEGORIES, str(path))


def key_from_record(record: Mapping[str, Any]) -> KeyedQuestion:
    """The keyed question of a ScienceQA record from ``mmkd.data`` (``ScienceQA`` or ``LlavaQuestionFile``).

    Args:
        record: A record with ``id``, ``answer`` (letter), ``choices`` and ``meta`` (docs/architecture.md).

    Returns:
        Its id, right letter, number of choices and categories.
    """
    rid = str(record.get("id"))
    answer = record.get("answer")
    choices = record.get("choices") or []
    if not isinstance(answer, str) or answer not in OPTION_LETTERS[: len(choices)]:
        raise ValueError(
            f"record {rid!r}: answer {answer!r}, expected one of its {len(choices)} option letters; "
            "a question file without answers cannot be scored"
        )
    return KeyedQuestion(rid, answer, len(choices), record_categories(record))
