from __future__ import annotations

import pytest

from mmkd.eval.parsing import Verdict, judge, parse_answer


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("E", "E"),
        ("B. apostrophe", "B"),
        ("C. ", "C"),
        ("The answer is C.", "C"),
        ("LECTURE: ... SOLUTION: ...\n The answer is D.", "D"),
        # The unescaped '.' of LLaVA's pattern takes any character after the letter ...
        ("The answer is B because", "B"),
        ("The answer is F.", "F"),  # parsed, but beyond any ScienceQA options
        # ... but not the end of the text, and only capital letters.
        ("The answer is B", None),
        ("The answer is b.", None),
        ("the answer is B.", None),
        # Two matching sentences: ambiguous, failed (even when they agree).
        ("The answer is A. The answer is B.", None),
        ("The answer is A. Yes, the answer is A.", "A"),  # the second is lower case: one match
        ("The answer is A. The answer is A.", None),
        ("The answer is A. The answer is: B.", "A"),  # only one has the exact form
        ("a", None),
        ("b. text", None),
        ("", None),
        ("AB", None),
        ("B.", None),  # shorter than "X. "
        ("B.text", None),
        (" B", None),  # LLaVA's scorer does not strip; mmkd's generation loop strips before writing
        ("B\n", None),
        ("F", None),  # not an option letter at all
        ("F. text", None),
        ("B is the run-on sentence.", None),  # a real LLaVA-1.5-13B output; counted as failed there too
        ("Cinder", None),
    ],
)
def test_parse_answer_follows_llava_rules(text: str, letter: str | None) -> None:
    assert parse_answer(text) == letter


@pytest.mark.parametrize(
    ("text", "answer", "num_choices", "verdict"),
    [
        ("B", "B", 2, Verdict.CORRECT),
        ("A", "B", 2, Verdict.WRONG),
        ("B. yes", "B", 3, Verdict.CORRECT),
        ("The answer is C.", "C", 3, Verdict.CORRECT),
        ("C", "A", 2, Verdict.INVALID_LETTER),  # a real option letter, beyond this question's two
        ("E", "A", 4, Verdict.INVALID_LETTER),
        ("The answer is F.", "A", 5, Verdict.INVALID_LETTER),
        ("The answer is B. The answer is B.", "B", 2, Verdict.FAILED_PARSE),
        ("", "A", 2, Verdict.FAILED_PARSE),
        ("b", "B", 2, Verdict.FAILED_PARSE),
        (None, "A", 2, Verdict.MISSING),
    ],
)
def test_judge(text: str | None, answer: str, num_choices: int, verdict: Verdict) -> None:
    assert judge(text, answer, num_choices) is verdict
