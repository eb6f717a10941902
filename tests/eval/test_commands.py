from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mmkd.eval.commands import parse_data_spec, score_command


def write_answers(path: Path, texts: dict[str, str]) -> Path:
    lines = [{"question_id": qid, "prompt": "?", "text": t, "answer_id": "x", "model_id": "m", "metadata": {}}
             for qid, t in texts.items()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_score_command_counts_right_wrong_failed_missing(tmp_path: Path, write_sqa: Callable[[Path], Path]) -> None:
    root = write_sqa(tmp_path / "sqa")
    answers = write_answers(tmp_path / "answers.jsonl", {
        "1": "A",                 # right (IMG, NAT, G1-6)
        "2": "B. blue",           # wrong
        "3": "The answer is A.",  # right
        "4": "steam",             # failed parse
        "5": "E",                 # letter beyond its 3 options
        # "6" missing
        "77": "A",                # names no question: ignored
    })
    out = tmp_path / "report"
    report = score_command(str(answers), data=f"sqa:{root}", out=str(out))
    assert json.loads((out / "metrics.json").read_text()) == report
    assert (report["correct"], report["count"]) == (2, 6)
    assert report["accuracy"] == pytest.approx(100 * 2 / 6)
    assert (report["failed_parses"], report["missing"], report["invalid_letters"]) == (1, 1, 1)
    cats = report["categories"]
    assert list(cats) == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]
    assert cats["NAT"] == {"accuracy": pytest.approx(100 / 3), "correct": 1, "count": 3}
    assert cats["SOC"] == {"accuracy": 100.0, "correct": 1, "count": 1}
    assert cats["LAN"] == {"accuracy": 0.0, "correct": 0, "count": 2}
    assert cats["TXT"] == {"accuracy": 0.0, "correct": 0, "count": 2}
    assert cats["IMG"] == {"accuracy": 50.0, "correct": 1, "count": 2}
    assert cats["NO"] == {"accuracy": pytest.approx(100 / 3), "correct": 1, "count": 3}
    assert cats["G1-6"] == {"accuracy": 50.0, "correct": 2, "count": 4}
    assert cats["G7-12"] == {"accuracy": 0.0, "correct": 0, "count": 2}
    assert set(report) == {"accuracy", "correct", "count", "failed_parses", "missing", "invalid_letters",
                           "categories", "exact_match"}


def test_score_command_with_a_question_file(tmp_path: Path) -> None:
    entries = [
        {"id": "1", "image": "1/image.png",
         "conversations": [{"from": "human", "value": "<image>\nWhich is red?\nA. apple\nB. sky"},
                           {"from": "gpt", "value": "A"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Context: Read.\nWhich is a verb?\nA. run\nB. blue"},
                                      {"from": "gpt", "value": "A"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Context: N/A\nWhich?\nA. x\nB. y\nC. z"},
                                      {"from": "gpt", "value": "C"}]},
    ]
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(entries))
    answers = write_answers(tmp_path / "a.jsonl", {"1": "A", "2": "A. run", "3": "B"})
    report = score_command(str(answers), questions=str(questions))
    assert (tmp_path / "metrics.json").is_file()  # default: next to the answer file
    assert (report["correct"], report["count"], report["failed_parses"], report["missing"]) == (2, 3, 0, 0)
    assert report["categories"] == {
        "TXT": {"accuracy": 100.0, "correct": 1, "count": 1},
        "IMG": {"accuracy": 100.0, "correct": 1, "count": 1},
        "NO": {"accuracy": 0.0, "correct": 0, "count": 1},
    }


def test_score_command_on_the_real_sample(tmp_path: Path, sqa_sample: Path) -> None:
    problems = json.loads((sqa_sample / "problems.json").read_text())
    test = json.loads((sqa_sample / "pid_splits.json").read_text())["test"]
    # Right on every natural-science problem, "The answer is" wrong elsewhere, the last 5 missing.
    texts = {}
    for pid in test[:-5]:
        p = problems[pid]
        letter = "ABCDE"[p["answer"]] if p["subject"] == "natural science" else "ABCDE"[(p["answer"] + 1) % 2]
        texts[pid] = f"The answer is {letter}."
    report = score_command(str(write_answers(tmp_path / "a.jsonl", texts)), data=f"sqa:{sqa_sample}")
    nat = sum(problems[pid]["subject"] == "natural science" for pid in test[:-5])
    assert (report["correct"], report["count"], report["missing"]) == (nat, 50, 5)
    assert report["categories"]["SOC"]["correct"] == report["categories"]["LAN"]["correct"] == 0


def test_user_errors_are_one_line(tmp_path: Path, write_sqa: Callable[[Path], Path]) -> None:
    root = write_sqa(tmp_path / "sqa")
    with pytest.raises(ValueError, match="exactly one of --data"):
        score_command("a.jsonl")
    with pytest.raises(FileNotFoundError, match="no such answer file"):
        score_command(str(tmp_path / "nope.jsonl"), data=f"sqa:{root}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "1", "text": "A"}\n{"question_id": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with 'question_id' and a string 'text'"):
        score_command(str(bad), data=f"sqa:{root}")
    with pytest.raises(ValueError, match="expected sqa:DIR"):
        parse_data_spec("coco:foo")
    assert parse_data_spec("llava:a/q.json:a/images/test") == ("llava", Path("a/q.json"), Path("a/images/test"))
    assert parse_data_spec("llava:a/q.json") == ("llava", Path("a/q.json"), None)


