"""Answer parsing exactly as LLaVA's ScienceQA scorer parses answers for LLaVA-1.5's published numbers.

LLaVA's ``llava/eval/eval_science_qa.py`` (the version that scored LLaVA-1.5) reads the ``text`` of each
answer line, without stripping it, and tries three rules in order:

1. the text is exactly one of the option letters ``A``-``E`` -> that letter;
2. the text is at least three characters, starts with an option letter and then ``". "`` -> that letter;
3. ``re.findall(r"The answer is ([A-Z]).", text)`` finds exactly one match -> that letter. The ``.`` in
   the pattern is not escaped, so any character (except a newline) may follow the letter, while a letter
   at the very end of the text does not match; lower-case ``the answer is`` does not match either.

Anything else is a failed parse. A letter that does not name one of the question's choices (``E`` for a
question with three choices, or ``F`` from rule 3) can never be right. Older versions of the script
replaced a failed parse by a random guess and skipped questions without an answer line; mmkd does neither:
both count wrong, and each kind is counted on its own.
"""

from __future__ import annotations

import re
from enum import Enum

OPTION_LETTERS = "ABCDE"
"""The option letters LLaVA's scorer accepts (its ``--options`` default); ScienceQA has at most 5 choices."""

_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


class Verdict(str, Enum):
    """How one question was scored."""

    CORRECT = "correct"
    WRONG = "wrong"
    FAILED_PARSE = "failed_parse"
    INVALID_LETTER = "invalid_letter"
    MISSING = "missing"


def parse_answer(text: str) -> str | None:
    """The letter an answer text gives, by LLaVA's rules (see the module docstring), or None if it fails.

    Args:
        text: The model's answer, as written in the ``text`` field of an answer line.

    Returns:
        An upper-case letter (possibly beyond the question's options), or None for a failed parse.
    """
    if len(text) == 1 and text in OPTION_LETTERS:
        return text
    if len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return None


def judge(text: str | None, answer: str, num_choices: int) -> Verdict:
    """Score one answer text against the right letter.

    Args:
        text: The answer text, or None when the answer file has no line for the question.
        answer: The right letter, ``"A"``-``"E"``.
        num_choices: How many choices the question has; letters past them are invalid.

    Returns:
        The verdict; only ``Verdict.CORRECT`` counts as right.
    """
    if text is None:
        return Verdict.MISSING
    letter = parse_answer(text)
    if letter is None:
        return Verdict.FAILED_PARSE
    if letter not in OPTION_LETTERS[:num_choices]:
        return Verdict.INVALID_LETTER
    return Verdict.CORRECT if letter == answer else Verdict.WRONG
