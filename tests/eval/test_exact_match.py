from __future__ import annotations

from pathlib import Path

import pytest

from mmkd.eval.answer_key import KeyedQuestion, load_question_file_key
from mmkd.eval.answers import read_answers
from mmkd.eval.exact_match import exact_match, strip_reasoning
from mmkd.eval.metric import ScienceQAAccuracy
from mmkd.eval.parsing import Verdict, judge
from mmkd.eval.score import score_answer_file

# (answer text, right letter, lmms-eval's verdict, LLaVA's verdict): where the two scorers part ways and where not.
CASES = [
    ("B", "B", True, True),
    ("b", "B", True, False),  # case-insensitive
    (" B", "B", True, False),  # stripped
    ("B\n", "B", True, False),
    ("B.", "B", True, False),  # "X." is enough, no space needed
    ("B.text", "B", True, False),
    ("B. apostrophe", "B", True, True),
    ("  B. apostrophe  ", "B", True, False),
    ("A. apostrophe", "B", False, False),
    ("b. apostrophe", "B", False, False),  # the first character must be upper case
    ("The answer is B.", "B", False, True),  # no letter extraction
    ("Hmm. The answer is B.", "B", False, True),
    ("B is the run-on sentence.", "B", False, False),
    ("(B)", "B", False, False),
    ("B)", "B", False, False),
    ("Answer: B", "B", False, False),
    ("", "B", False, False),
    ("E", "B", False, False),
    ("É. text", "B", False, False),  # any upper-case first character is read, and is simply not the letter
    ("<think>A or B?</think>B", "B", True, False),  # reasoning cut out (lmms-eval's command-line default)
    ("the answer</think> B", "B", True, False),  # an opening tag put in the prompt: only the answer is left
    (None, "B", False, False),  # no answer
]


@pytest.mark.parametrize(("text", "answer", "lmms_eval", "llava"), CASES)
def test_exact_match_cases(text: str | None, answer: str, lmms_eval: bool, llava: bool) -> None:
    assert exact_match(text, answer) is lmms_eval
    assert (judge(text, answer, 5) is Verdict.CORRECT) is llava


def test_reasoning_tags_are_optional() -> None:
    assert exact_match("<think>x</think>B", "B") is True
    # lmms-eval's Python API leaves reasoning in unless asked: the text then starts with "<".
    assert exact_match("<think>x</think>B", "B", reasoning_tags=()) is False
    assert strip_reasoning("<think>a</think> B <analysis>b</analysis> ") == "B"
    assert strip_reasoning("</think>B<think>") == "</think>B<think>"  # closing before opening: left alone
    assert strip_reasoning("<THINK>a</THINK>B") == "<THINK>a</THINK>B"  # case-sensitive


def _lmms_eval_score(text: str | None, answer: str, num_choices: int, reasoning: bool = True) -> bool:
    """Score one answer with lmms-eval's own code, along the path its evaluator takes for scienceqa_img."""
    from lmms_eval.api.reasoning import parse_reasoning_tags_config, strip_reasoning_tags
    from lmms_eval.tasks.scienceqa.utils import sqa_process_results

    doc = {"choices": [f"choice {i}" for i in range(num_choices)], "answer": "ABCDE".index(answer)}
    response = "" if text is None else text  # ConfigurableTask.process_results: None -> ""
    if reasoning:  # the command line's --reasoning_tags default
        default = '[["<think>", "</think>"], ["<analysis>", "</analysis>"]]'
        response = strip_reasoning_tags(response, parse_reasoning_tags_config(cli_value=default))
    score = sqa_process_results(doc, [response.strip()])  # ConfigurableTask.process_results strips first
    return score["exact_match"] == 1.0


@pytest.mark.parametrize(("text", "answer", "expected", "_llava"), CASES)
def test_parity_with_lmms_eval(text: str | None, answer: str, expected: bool, _llava: bool) -> None:
    pytest.importorskip("lmms_eval", reason="lmms-eval (dev extra) is not installed")
    assert _lmms_eval_score(text, answer, 5) is expected
    assert _lmms_eval_score(text, answer, 5, reasoning=False) is exact_match(text, answer, ())


def test_metric_reports_exact_match_beside_llava() -> None:
    questions = [
        KeyedQuestion("1", "A", 2, frozenset({"NAT", "G1-6", "IMG"})),
        KeyedQuestion("2", "B", 3, frozenset({"SOC", "G1-6", "TXT"})),
        KeyedQuestion("3", "C", 4, frozenset({"LAN", "G7-12", "NO"})),
        KeyedQuestion("4", "A", 2, frozenset({"NAT", "G7-12", "IMG"})),
    ]
    # LLaVA: right, wrong (lower case), right, right. lmms-eval: right, right, right, wrong ("The answer is").
    metric = ScienceQAAccuracy(categories=("TXT", "IMG", "NO"))
    metric.update(["A", "b", "C. sand", "The answer is A."], questions)
    report = metric.report()
    assert (report["correct"], report["count"], report["failed_parses"]) == (3, 4, 1)
    assert report["exact_match"] == {
        "accuracy": 75.0, "correct": 3, "count": 4,
        "categories": {"TXT": {"accuracy": 100.0, "correct": 1, "count": 1},
                       "IMG": {"accuracy": 50.0, "correct": 1, "count": 2},
                       "NO": {"accuracy": 100.0, "correct": 1, "count": 1}},
    }
    flat = metric.compute()
    assert flat["exact_match"].item() == 75.0 and flat["IMG/exact_match/correct"].item() == 1
    assert "NAT/exact_match" not in flat


def test_published_llava_answers_score_the_same_by_both_rules(sqa_reference: Path) -> None:
    key = load_question_file_key(sqa_reference / "llava_test_CQM-A.json")
    v15 = score_answer_file(sqa_reference / "answers_llava-v1.5-13b.jsonl", key)
    # The 3,711 bare letters and 525 "X. option" answers count alike; the 5 failed parses fail both rules.
    assert (v15["correct"], v15["exact_match"]["correct"], v15["exact_match"]["count"]) == (3155, 3155, 4241)
    assert v15["exact_match"]["categories"]["IMG"] == v15["categories"]["IMG"]  # 1,445 / 2,017: scienceqa_img
    assert round(v15["exact_match"]["accuracy"], 2) == 74.39
    v0 = score_answer_file(sqa_reference / "answers_llava-13b-v0.jsonl", key)
    # "... The answer is X." answers: 90.90 by LLaVA's rule, none by exact match.
    assert (v0["correct"], v0["exact_match"]["correct"]) == (3855, 0)


def test_published_answers_agree_with_lmms_eval_itself(sqa_reference: Path) -> None:
    pytest.importorskip("lmms_eval", reason="lmms-eval (dev extra) is not installed")
    key = load_question_file_key(sqa_reference / "llava_test_CQM-A.json")
    answers = read_answers(sqa_reference / "answers_llava-v1.5-13b.jsonl")
    for question in key.questions:
        text = answers.get(question.question_id)
        expected = _lmms_eval_score(text, question.answer, question.num_choices)
        assert exact_match(text, question.answer) is expected, (question.question_id, text)


def test_printed_table_has_the_exact_match_column() -> None:
    from rich.console import Console

    from mmkd.eval.report import print_report

    questions = [KeyedQuestion("1", "B", 2, frozenset({"IMG"})), KeyedQuestion("2", "A", 2, frozenset({"NO"}))]
    metric = ScienceQAAccuracy(categories=("IMG", "NO"))
    metric.update(["b", "A"], questions)
    console = Console(width=120, record=True)
    print_report(metric.report(), "two answers", console)
    lines = console.export_text().splitlines()
    assert "lmms-eval exact match %" in lines[2]
    rows = {cells[0]: cells[1:] for line in lines if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 5}
    assert rows["overall"] == ["50.00", "1", "2", "100.00"]
    assert rows["IMG"] == ["0.00", "0", "1", "100.00"]
    assert rows["NO"] == ["100.00", "1", "1", "100.00"]
