"""LLaVA answer files: one JSON line per question, written as answers come and read back for scoring.

The line format is the one LLaVA's ``model_vqa_science.py`` writes and its scorer reads::

    {"question_id": "5", "prompt": "<image>\\nContext: ...", "text": "B", "answer_id": "...",
     "model_id": "llava-v1.5-13b", "metadata": {}}
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO


class AnswerWriter:
    """Appends answer lines to a file, one flushed line per answer, so nothing is held in memory.

    Args:
        path: The ``answers.jsonl`` to write (replaced if it exists; its folder is created).
        model_id: Written in every line's ``model_id``.
    """

    def __init__(self, path: str | Path, model_id: str) -> None:
        self.path = Path(path)
        self.model_id = model_id
        self.lines = 0
        self._file: TextIO | None = None

    def __enter__(self) -> AnswerWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, question_id: str, prompt: str, text: str, metadata: dict[str, Any] | None = None) -> None:
        """Write one answer line.

        Args:
            question_id: The question's id (ScienceQA pid).
            prompt: The prompt as LLaVA writes it: the user turn, ``<image>\\n`` first when there is an image.
            text: The model's answer.
            metadata: Extra fields (LLaVA writes ``{}``).
        """
        if self._file is None:
            raise RuntimeError("AnswerWriter.write outside its `with` block")
        line = {
            "question_id": question_id,
            "prompt": prompt,
            "text": text,
            "answer_id": uuid.uuid4().hex[:22],
            "model_id": self.model_id,
            "metadata": metadata or {},
        }
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()
        self.lines += 1


def read_answers(path: str | Path) -> dict[str, str]:
    """The answer texts of an answer file, by question id.

    As in LLaVA's scorer, a later line for the same question replaces an earlier one; blank lines are
    skipped. Question ids are compared as strings (some tools write ScienceQA pids as numbers).

    Args:
        path: A JSON-lines file whose lines have at least ``question_id`` and ``text``.

    Returns:
        ``{question_id: text}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such answer file (expected JSON lines with question_id and text)")
    answers: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); expected one answer object") from None
            if not isinstance(line, dict) or "question_id" not in line or not isinstance(line.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with 'question_id' and a string 'text'")
            answers[str(line["question_id"])] = line["text"]
    return answers
