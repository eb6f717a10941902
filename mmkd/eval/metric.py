"""ScienceQA accuracy by category as a torchmetrics ``Metric``: sum states, so it merges across DDP ranks.

Every answer is scored twice: by LLaVA's rules (``mmkd.eval.parsing``, the published protocol, the main figures)
and by lmms-eval's exact match (``mmkd.eval.exact_match``, reported beside them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mmkd.eval.answer_key import KeyedQuestion
from mmkd.eval.categories import CATEGORIES
from mmkd.eval.exact_match import exact_match
from mmkd.eval.parsing import Verdict, judge


class ScienceQAAccuracy(Metric):
    """Accuracy overall and per ScienceQA category, with the parse failures and missing answers counted.

    Every state is a count reduced by sum, so the merged metric of several DDP ranks equals the metric of
    one process that saw all their questions (provided each question is seen by exactly one rank; a
    distributed sampler that pads the last batch repeats questions, so drop the padding before ``update``).

    Example:
        >>> metric = ScienceQAAccuracy()
        >>> metric.update(["B", "The answer is A."], [q1, q2])  # q1, q2: KeyedQuestion
        >>> metric.report()["accuracy"]

    Args:
        categories: The categories to report (``compute`` and ``report`` leave the others out); every
            category is counted regardless, so metrics with different choices still merge.
        kwargs: Passed to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    exact_match_correct: Tensor
    count: Tensor
    failed_parses: Tensor
    missing: Tensor
    invalid_letters: Tensor

    def __init__(self, categories: Sequence[str] = CATEGORIES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"ScienceQAAccuracy: unknown categories {unknown}; expected some of {list(CATEGORIES)}")
        self.categories = tuple(categories)
        # Slot 0 is overall, slot 1 + i is CATEGORIES[i].
        self.add_state("correct", torch.zeros(1 + len(CATEGORIES), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(1 + len(CATEGORIES), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "exact_match_correct", torch.zeros(1 + len(CATEGORIES), dtype=torch.long), dist_reduce_fx="sum"
        )
        for name in ("failed_parses", "missing", "invalid_letters"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, texts: Sequence[str | None], questions: Sequence[KeyedQuestion]) -> None:
        """Score a batch of answers.

        Args:
            texts: The answer texts, one per question; None where the question got no answer.
            questions: The questions they answer, with their right letters and categories.
        """
        if len(texts) != len(questions):
            raise ValueError(f"ScienceQAAccuracy.update: {len(texts)} texts for {len(questions)} questions")
        correct = [0] * (1 + len(CATEGORIES))
        matched = [0] * (1 + len(CATEGORIES))
        count = [0] * (1 + len(CATEGORIES))
        kinds = {Verdict.FAILED_PARSE: 0, Verdict.MISSING: 0, Verdict.INVALID_LETTER: 0}
        for text, question in zip(texts, questions):
            verdict = judge(text, question.answer, question.num_choices)
            is_match = exact_match(text, question.answer)
            if verdict in kinds:
                kinds[verdict] += 1
            slots = [0] + [1 + i for i, c in enumerate(CATEGORIES) if c in question.categories]
            for slot in slots:
                count[slot] += 1
                correct[slot] += verdict is Verdict.CORRECT
                matched[slot] += is_match
        self.correct += torch.tensor(correct, dtype=torch.long, device=self.correct.device)
        self.exact_match_correct += torch.tensor(matched, dtype=torch.long, device=self.exact_match_correct.device)
        self.count += torch.tensor(count, dtype=torch.long, device=self.count.device)
        self.failed_parses += kinds[Verdict.FAILED_PARSE]
        self.missing += kinds[Verdict.MISSING]
        self.invalid_letters += kinds[Verdict.INVALID_LETTER]

    def compute(self) -> dict[str, Tensor]:
        """Flat values, ready for ``LightningModule.log_dict``.

        Returns:
            ``accuracy`` (percent), ``correct``, ``count``, ``failed_parses``, ``missing``,
            ``invalid_letters``, ``exact_match`` (lmms-eval's percent) and ``exact_match/correct``, and per
            reported category ``C`` the percent ``C`` (NaN when it has no questions), ``C/correct``, ``C/count``,
            ``C/exact_match`` and ``C/exact_match/correct``.
        """
        correct, count, matched = self.correct, self.count, self.exact_match_correct
        percent = correct.double() * 100.0 / count.double()  # 0/0 -> NaN: no questions in that category
        match_percent = matched.double() * 100.0 / count.double()
        values = {
            "accuracy": percent[0],
            "correct": correct[0],
            "count": count[0],
            "failed_parses": self.failed_parses,
            "missing": self.missing,
            "invalid_letters": self.invalid_letters,
            "exact_match": match_percent[0],
            "exact_match/correct": matched[0],
        }
        for i, name in enumerate(CATEGORIES):
            if name in self.categories:
                values[name] = percent[1 + i]
                values[f"{name}/correct"] = correct[1 + i]
                values[f"{name}/count"] = count[1 + i]
                values[f"{name}/exact_match"] = match_percent[1 + i]
                values[f"{name}/exact_match/correct"] = matched[1 + i]
        return values

    def report(self) -> dict[str, Any]:
        """The ``metrics.json`` structure (see docs/evaluation.md), from the merged states.

        Returns:
            ``{"accuracy", "correct", "count", "failed_parses", "missing", "invalid_letters",
            "categories": {C: {"accuracy", "correct", "count"}}, "exact_match": {"accuracy", "correct", "count",
            "categories": {C: {...}}}}``, where ``exact_match`` holds the same figures by lmms-eval's rule; an
            accuracy is None where there are no questions.
        """
        values = self.compute()

        def percent(correct: int, count: int) -> float | None:
            return correct * 100.0 / count if count else None

        report: dict[str, Any] = {
            "accuracy": percent(int(values["correct"]), int(values["count"])),
            "correct": int(values["correct"]),
            "count": int(values["count"]),
            "failed_parses": int(values["failed_parses"]),
            "missing": int(values["missing"]),
            "invalid_letters": int(values["invalid_letters"]),
            "categories": {},
        }
        for name in CATEGORIES:
            if name in self.categories:
                n_correct, n = int(values[f"{name}/correct"]), int(values[f"{name}/count"])
                report["categories"][name] = {"accuracy": percent(n_correct, n), "correct": n_correct, "count": n}
        n_matched = int(values["exact_match/correct"])
        matches: dict[str, Any] = {"accuracy": percent(n_matched, report["count"]), "correct": n_matched,
                                   "count": report["count"], "categories": {}}
        for name in (c for c in CATEGORIES if c in self.categories):
            n_matched, n = int(values[f"{name}/exact_match/correct"]), int(values[f"{name}/count"])
            matches["categories"][name] = {"accuracy": percent(n_matched, n), "correct": n_matched, "count": n}
        report["exact_match"] = matches
        return report
