"""ScienceQA in its own layout, rendered into LLaVA-1.5's prompt.

Layout: ``problems.json`` (pid -> problem), ``pid_splits.json`` (split -> [pid]) and
``images/<split>/<pid>/image.png`` for problems whose ``image`` is set.
"""

from __future__ import annotations

import os
from typing import Any

from mmkd.data.records import BadRecord, Record, RecordDataset, load_json

SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SUBJECT_CODES = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_REQUIRED = {"question": str, "choices": list, "answer": int}


def letters(n: int) -> list[str]:
    """The first ``n`` option letters: ``A``, ``B``, ..."""
    return [chr(ord("A") + i) for i in range(n)]


def render_sqa_prompt(problem: dict[str, Any]) -> str:
    """LLaVA-1.5's ScienceQA prompt for one problem (lines joined by ``\\n``).

    ``<image>`` when the problem has an image, ``Context: {hint}`` only when the hint is non-empty, the question,
    one ``A. choice`` line per option, then ``Answer with the option's letter from the given choices directly.``
    Identical, character for character, to the prompts of LLaVA-1.5's published ScienceQA answer files.
    """
    lines = []
    if problem.get("image"):
        lines.append("<image>")
    hint = (problem.get("hint") or "").strip()
    if hint:
        lines.append(f"Context: {problem['hint']}")
    lines.append(problem["question"])
    lines.extend(f"{letter}. {choice}" for letter, choice in zip(letters(len(problem["choices"])), problem["choices"]))
    lines.append(SQA_INSTRUCTION)
    return "\n".join(lines)


def _grade(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.removeprefix("grade").isdigit():
        return int(value.removeprefix("grade"))
    return None


def validate_problem(problem: Any, where: str) -> None:
    """Raise ``BadRecord`` unless ``problem`` follows the ScienceQA schema the reader relies on."""
    if not isinstance(problem, dict):
        raise BadRecord(f"{where}: expected an object, got {type(problem).__name__}")
    for key, typ in _REQUIRED.items():
        if not isinstance(problem.get(key), typ) or isinstance(problem.get(key), bool):
            raise BadRecord(f"{where}: '{key}' must be a {typ.__name__}, got {problem.get(key)!r}"[:300])
    choices = problem["choices"]
    if not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        raise BadRecord(f"{where}: 'choices' must be 2-26 strings, got {choices!r}"[:300])
    if not 0 <= problem["answer"] < len(choices):
        raise BadRecord(f"{where}: answer index {problem['answer']} is outside the {len(choices)} choices")
    if problem.get("hint") is not None and not isinstance(problem["hint"], str):
        raise BadRecord(f"{where}: 'hint' must be a string")
    if problem.get("image") is not None and not isinstance(problem["image"], str):
        raise BadRecord(f"{where}: 'image' must be a file name or null")
    if problem.get("subject") not in SUBJECT_CODES:
        raise BadRecord(f"{where}: 'subject' must be one of {sorted(SUBJECT_CODES)}, got {problem.get('subject')!r}")
    grade = _grade(problem.get("grade"))
    if grade is None or not 1 <= grade <= 12:
        raise BadRecord(f"{where}: 'grade' must be 'grade1'..'grade12', got {problem.get('grade')!r}")


class ScienceQA(RecordDataset):
    """One split of ScienceQA (or a dataset in its layout, such as ``mmkd data synth-sqa``'s world).

    Records: ``{"id": pid, "images", "messages", "answer": letter, "choices", "meta"}``; the user turn is
    ``render_sqa_prompt(problem)``, the assistant turn (when ``with_answer``) the answer letter. ``meta`` holds
    ``subject`` (``NAT``/``SOC``/``LAN``), ``grade`` (int), ``hint``, ``has_image``, ``has_context`` (non-empty
    hint: ScienceQA's TXT), ``no_context`` (neither image nor hint: NO), ``topic``, ``category``, ``skill``,
    ``task``, ``lecture``, ``solution`` and ``answer_index``.

    Args:
        root: Folder with ``problems.json``, ``pid_splits.json`` and ``images/``.
        split: A key of ``pid_splits.json`` (``train``, ``val``, ``test``, ``minival``, ...).
        skip_bad: Skip and count bad problems instead of raising (see ``RecordDataset``).
        with_answer: Add the assistant turn with the answer letter (training); off for generation.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "test",
        skip_bad: bool = False,
        with_answer: bool = True,
    ) -> None:
        problems_path = os.path.join(root, "problems.json")
        splits_path = os.path.join(root, "pid_splits.json")
        super().__init__(problems_path, skip_bad)
        self.root, self.split, self.with_answer = str(root), split, with_answer
        problems = load_json(problems_path)
        splits = load_json(splits_path)
        if not isinstance(problems, dict):
            raise ValueError(f"{problems_path}: expected an object mapping pid -> problem")
        if not isinstance(splits, dict) or split not in splits:
            raise ValueError(
                f"{splits_path}: no split '{split}'; expected one of {sorted(splits) if isinstance(splits, dict) else []}"  # noqa: E501
            )
        pids = splits[split]
        if not isinstance(pids, list) or not pids:
            raise ValueError(f"{splits_path}: split '{split}' is empty; expected a non-empty list of pids")
        for pid in pids:
            pid = str(pid)
            where = f"{problems_path}: problem '{pid}'"
            try:
                if pid not in problems:
                    raise BadRecord(
                        f"{where}: listed in split '{split}' of {splits_path} but absent from problems.json"
                    )
                entry = self._parse(problems[pid], pid, where)
            except BadRecord as e:
                self._reject(e)
                continue
            if self._check_images(where, entry["image_paths"]):
                self._entries.append(entry)
        self._finish()

    def _parse(self, problem: Any, pid: str, where: str) -> dict[str, Any]:
        validate_problem(problem, where)
        prompt = render_sqa_prompt(problem)
        letter = letters(len(problem["choices"]))[problem["answer"]]
        messages = [{"role": "user", "content": prompt}]
        if self.with_answer:
            messages.append({"role": "assistant", "content": letter})
        has_image = bool(problem.get("image"))
        hint = problem.get("hint") or ""
        paths = []
        if has_image:
            image_split = problem.get("split") or self.split  # mini splits keep their images under the full split
            paths = [os.path.join(self.root, "images", image_split, pid, problem["image"])]
        meta = {
            "subject": SUBJECT_CODES[problem["subject"]],
            "grade": _grade(problem["grade"]),
            "hint": hint,
            "has_image": has_image,
            "has_context": bool(hint.strip()),
            "no_context": not has_image and not hint.strip(),
            "answer_index": problem["answer"],
            **{k: problem.get(k, "") for k in ("topic", "category", "skill", "task", "lecture", "solution")},
        }
        return {
            "id": pid,
            "where": where,
            "image_paths": paths,
            "messages": messages,
            "answer": letter,
            "choices": list(problem["choices"]),
            "meta": meta,
        }

    def _make(self, entry: dict[str, Any]) -> Record:
        record = super()._make(entry)
        record.update(answer=entry["answer"], choices=list(entry["choices"]), meta=dict(entry["meta"]))
        return record
