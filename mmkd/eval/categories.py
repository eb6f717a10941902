"""ScienceQA's reporting categories, as ScienceQA's own scorer (and LLaVA's copy of it) defines them.

* NAT / SOC / LAN: the problem's ``subject`` is natural / social / language science;
* TXT: the problem has a non-empty ``hint`` (the text context);
* IMG: the problem has an image;
* NO: neither a hint nor an image;
* G1-6 / G7-12: ``grade`` is grade1..grade6 / grade7..grade12.

A LLaVA question file determines only IMG, TXT and NO: IMG when the prompt carries ``<image>`` (what LLaVA's
scorer checks), TXT when it has a ``Context:`` line whose text is not ``N/A`` (older question files write
``Context: N/A`` when there is no hint, newer ones leave the line out).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
"""Every category, in the order ScienceQA's tables print them."""

PROMPT_CATEGORIES = ("TXT", "IMG", "NO")
"""The categories a LLaVA question file's prompt determines without ``problems.json``."""

_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_CONTEXT_LINE = re.compile(r"^Context: ?(.*)$", re.MULTILINE)


def _grade_category(grade: str | int) -> str | None:
    match = re.fullmatch(r"(?:grade)?(\d+)", str(grade).strip().lower())
    if match is None:
        return None
    number = int(match.group(1))
    if 1 <= number <= 6:
        return "G1-6"
    if 7 <= number <= 12:
        return "G7-12"
    return None


def problem_categories(subject: str, grade: str | int, hint: str, has_image: bool) -> frozenset[str]:
    """Categories of one ScienceQA problem from its ``problems.json`` fields.

    Args:
        subject: ``"natural science"``, ``"social science"`` or ``"language science"`` (or the codes
            ``NAT``/``SOC``/``LAN`` that ``mmkd.data.ScienceQA`` records carry).
        grade: ``"grade1"`` .. ``"grade12"`` (or the number).
        hint: The problem's text context (``""`` when it has none).
        has_image: Whether the problem has an image (its ``image`` field is set).

    Returns:
        The categories it belongs to, a subset of ``CATEGORIES``.
    """
    found = set()
    if subject in _SUBJECTS:
        found.add(_SUBJECTS[subject])
    elif subject in _SUBJECTS.values():
        found.add(subject)
    grade_category = _grade_category(grade)
    if grade_category is not None:
        found.add(grade_category)
    # ScienceQA tests truthiness: any non-empty hint is text context, even whitespace.
    return frozenset(found | _context_categories(bool(hint), has_image))


def prompt_categories(prompt: str) -> frozenset[str]:
    """Categories a LLaVA question-file prompt determines (a subset of ``PROMPT_CATEGORIES``).

    Args:
        prompt: The human turn of a question-file entry (or an answer line's ``prompt``).

    Returns:
        IMG if it carries ``<image>``; TXT if a ``Context:`` line's text is not ``N/A``; NO if neither.
    """
    has_image = "<image>" in prompt
    match = _CONTEXT_LINE.search(prompt)
    has_text = match is not None and match.group(1).strip() not in ("", "N/A")
    return frozenset(_context_categories(has_text, has_image))


def _context_categories(has_text: bool, has_image: bool) -> set[str]:
    """TXT / IMG / NO as ScienceQA defines them: NO is neither text context nor image."""
    found = set()
    if has_text:
        found.add("TXT")
    if has_image:
        found.add("IMG")
    if not has_text and not has_image:
        found.add("NO")
    return found


def record_categories(record: Mapping[str, Any]) -> frozenset[str]:
    """Categories of a ScienceQA record from ``mmkd.data`` (see docs/architecture.md, "Records").

    Records of ``mmkd.data.ScienceQA`` carry ``meta`` with subject, grade, hint and has_image; records of a
    LLaVA question file do not, and then the first user turn decides, as in ``prompt_categories``.

    Args:
        record: A ScienceQA record (``id``, ``images``, ``messages``, ``answer``, ``choices``, ``meta``).

    Returns:
        Its categories.
    """
    meta = record.get("meta") or {}
    if "subject" in meta and "grade" in meta:
        has_image = bool(meta["has_image"]) if "has_image" in meta else bool(record.get("images"))
        return problem_categories(str(meta["subject"]), meta["grade"], meta.get("hint") or "", has_image)
    user_turns = [m["content"] for m in record.get("messages", []) if m.get("role") == "user"]
    return prompt_categories(user_turns[0] if user_turns else "")
