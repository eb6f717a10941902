"""ScienceQA scoring as lmms-eval scores its ``scienceqa`` and ``scienceqa_img`` tasks ("exact match").

lmms-eval 0.7 (``lmms_eval/tasks/scienceqa/utils.py::sqa_process_results``, reached through
``ConfigurableTask.process_results``, which strips every generated text first) scores one answer so:

0. its command line (``--reasoning_tags``, on by default; off through the Python API) first cuts reasoning
   blocks out of the generated text: ``<think>...</think>`` and ``<analysis>...</analysis>`` (case-sensitive;
   a closing tag without its opening one keeps only what follows the last closing tag);
1. the answer is stripped of surrounding whitespace (twice, to the same effect);
2. it is right if, lower-cased, it equals the lower-cased right letter (``b``, `` B ``, ``B`` all match B);
3. otherwise, if it is at least two characters, its first character is upper case (``str.isupper``) and its
   second is ``.``, it is right when that first character, lower-cased, is the right letter
   (``B. text``, ``B.text`` and ``B.`` match B);
4. anything else is wrong: ``The answer is B.``, ``b. text``, ``(B)``, ``B)``, ``Answer: B``.

The task yaml lists ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``, but those options belong to
the harness's generic metric, which ``process_results`` replaces: they play no part. There is no filter and no
letter extraction. The task's score is the mean over its questions (a fraction; mmkd reports percent):
``scienceqa_img`` is the 2,017 test questions with an image (mmkd's IMG category), ``scienceqa`` all 4,241.

Compared with LLaVA's scorer (``mmkd.eval.parsing``): stripping and case-insensitivity accept more bare letters,
``X.`` without a space after it counts, any upper-case first letter is read (so a letter beyond the options is
simply wrong, not counted apart), and ``The answer is X.`` never counts.
"""

from __future__ import annotations

from collections.abc import Sequence

REASONING_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("<analysis>", "</analysis>"))
"""The reasoning blocks lmms-eval's command line removes before scoring (its ``--reasoning_tags`` default)."""


def strip_reasoning(text: str, tags: Sequence[tuple[str, str]] = REASONING_TAGS) -> str:
    """The text without its reasoning blocks, as lmms-eval's ``strip_reasoning_tags`` leaves it.

    Args:
        text: A generated text.
        tags: ``(start, end)`` tag pairs, removed one pair after the other.

    Returns:
        The text with every complete ``start ... end`` block cut out; where only closing tags remain (a chat
        template that put the opening tag in the prompt), what follows the last one; stripped.
    """
    for start_tag, end_tag in tags:
        while start_tag in text and end_tag in text:
            start = text.find(start_tag)
            end = text.find(end_tag, start)
            if end == -1:  # the closing tag comes only before the opening one
                break
            text = text[:start] + text[end + len(end_tag) :]
        if end_tag in text and start_tag not in text:
            text = text.rsplit(end_tag, 1)[-1]
    return text.strip()


def exact_match(text: str | None, answer: str, reasoning_tags: Sequence[tuple[str, str]] = REASONING_TAGS) -> bool:
    """Whether lmms-eval's ScienceQA tasks score an answer text right (see the module docstring).

    The choices play no part: lmms-eval turns the right choice's index into its letter and compares the answer
    with that letter only.

    Args:
        text: The model's answer as generated; None when the question got no answer (wrong).
        answer: The right letter, ``"A"``-``"E"``.
        reasoning_tags: The reasoning blocks removed first (lmms-eval's command-line default); ``()`` scores as
            lmms-eval's Python API does by default.

    Returns:
        True when the answer counts as right.
    """
    if text is None:
        return False
    target = answer.strip().lower()
    pred = strip_reasoning(text, reasoning_tags) if reasoning_tags else text.strip()
    if pred.lower() == target:
        return True
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0].lower() == target
    return False
