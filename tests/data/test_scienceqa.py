import json
from pathlib import Path

import pytest
from conftest import SQA_REFERENCE, SQA_SAMPLE, write_image, write_json

from mmkd.data.llava import LlavaQuestionFile
from mmkd.data.scienceqa import SQA_INSTRUCTION, ScienceQA, render_sqa_prompt

needs_sample = pytest.mark.skipif(not SQA_SAMPLE.is_dir(), reason=f"real ScienceQA sample not at {SQA_SAMPLE}")
needs_reference = pytest.mark.skipif(not SQA_REFERENCE.is_dir(), reason=f"LLaVA ScienceQA files not at {SQA_REFERENCE}")


def test_render_format_by_hand() -> None:
    problem = {"question": "Which is red?", "choices": ["apple", "sky"], "answer": 0, "hint": "Look.", "image": "x.png"}
    assert render_sqa_prompt(problem) == f"<image>\nContext: Look.\nWhich is red?\nA. apple\nB. sky\n{SQA_INSTRUCTION}"
    problem.update(hint="", image=None, choices=["a", "b", "c", "d", "e"])
    assert render_sqa_prompt(problem) == f"Which is red?\nA. a\nB. b\nC. c\nD. d\nE. e\n{SQA_INSTRUCTION}"


def test_render_matches_the_vendored_llava_prompts_on_every_checkout() -> None:
    """LLaVA-1.5's published prompts of the 50 sample problems, their text replaced by placeholders
    (tests/data/fixtures/make_prompt_fixture.py): the formatting rules, checked without the licensed data."""
    fixture = json.loads((Path(__file__).parent / "fixtures" / "llava_prompts.json").read_text())
    cases = fixture["cases"]
    assert len(cases) == 50
    kinds = set()
    for case in cases:
        p = case["problem"]
        rendered = render_sqa_prompt(p)
        assert rendered == case["published_prompt"], case["pid"]
        assert rendered == case["question_file_prompt"] + "\n" + SQA_INSTRUCTION, case["pid"]
        kinds.add((bool(p["hint"].strip()), bool(p["image"]), len(p["choices"])))
    assert {h for h, _, _ in kinds} == {True, False} and {i for _, i, _ in kinds} == {True, False}
    assert {n for _, _, n in kinds} >= {2, 3, 4, 5}


@needs_sample
@needs_reference
def test_render_matches_llava_published_prompts_character_by_character() -> None:
    problems = json.loads((SQA_SAMPLE / "problems.json").read_text())
    published = {}
    for line in (SQA_REFERENCE / "answers_llava-v1.5-13b.jsonl").read_text().splitlines():
        row = json.loads(line)
        published[row["question_id"]] = row["prompt"]
    questions = {q["id"]: q for q in json.loads((SQA_REFERENCE / "llava_test_CQM-A.json").read_text())}
    common = [pid for pid in problems if pid in published]
    assert len(common) == 50
    kinds = set()
    for pid in common:
        p = problems[pid]
        rendered = render_sqa_prompt(p)
        assert rendered == published[pid], pid
        # LLaVA's question file stops after the options; the instruction is appended at evaluation time.
        assert rendered == questions[pid]["conversations"][0]["value"] + "\n" + SQA_INSTRUCTION, pid
        kinds.add((bool(p["hint"]), bool(p["image"]), len(p["choices"])))
    # hint/no hint, image/no image, 2..5 options are all covered by the sample
    assert {h for h, _, _ in kinds} == {True, False} and {i for _, i, _ in kinds} == {True, False}
    assert {n for _, _, n in kinds} >= {2, 3, 4, 5}


@needs_sample
def test_reader_on_real_sample_counts_missing_images() -> None:
    problems = json.loads((SQA_SAMPLE / "problems.json").read_text())
    splits = json.loads((SQA_SAMPLE / "pid_splits.json").read_text())
    ds = ScienceQA(SQA_SAMPLE, "val", skip_bad=True)  # the sample ships no images
    with_image = [pid for pid in splits["val"] if problems[pid]["image"]]
    assert len(ds) == len(splits["val"]) - len(with_image) and len(ds.skipped) == len(with_image)
    assert all("not found" in s for s in ds.skipped)
    rec = ds[0]
    p = problems[rec["id"]]
    assert rec["messages"][0]["content"] == render_sqa_prompt(p)
    assert rec["answer"] == "ABCDE"[p["answer"]] == rec["messages"][1]["content"]
    assert rec["meta"]["grade"] == int(p["grade"].removeprefix("grade")) and rec["images"] == []
    with pytest.raises(FileNotFoundError, match=r"problems.json: problem '\d+': image .*image.png not found"):
        ScienceQA(SQA_SAMPLE, "val")


@needs_reference
def test_llava_question_file_reader() -> None:
    ds = LlavaQuestionFile(SQA_REFERENCE / "llava_test_CQM-A.json", "/nonexistent", skip_bad=True)
    assert len(ds) == 4241 - 2017 and len(ds.skipped) == 2017  # text-only questions remain
    rec = next(ds[i] for i in range(len(ds)) if ds[i]["id"] == "512")  # options spanning two lines
    assert rec["choices"] == ["See you soon,\nJanet", "See You Soon,\nJanet"] and rec["answer"] in "AB"
    assert rec["messages"][0]["content"].endswith("\n" + SQA_INSTRUCTION)


def _world(tmp_path, problems, splits=None, images=True):
    root = tmp_path / "sqa"
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", splits or {"train": list(problems)})
    if images:
        for pid, p in problems.items():
            if p.get("image"):
                write_image(root / "images" / p.get("split", "train") / pid / "image.png")
    return root


def _problem(**kw):
    p = {"question": "Which?", "choices": ["x", "y", "z"], "answer": 2, "hint": "", "image": "image.png",
         "grade": "grade3", "subject": "natural science", "split": "train"}  # fmt: skip
    p.update(kw)
    return p


def test_reader_record_with_image(tmp_path) -> None:
    root = _world(tmp_path, {"7": _problem(hint="Some context.")})
    rec = ScienceQA(root, "train")[0]
    assert rec["id"] == "7" and len(rec["images"]) == 1 and rec["images"][0].mode == "RGB"
    assert rec["messages"][0]["content"].startswith("<image>\nContext: Some context.\nWhich?\nA. x")
    assert rec["answer"] == "C" and rec["choices"] == ["x", "y", "z"]
    assert rec["meta"]["subject"] == "NAT" and rec["meta"]["has_context"] and not rec["meta"]["no_context"]
    no_answer = ScienceQA(root, "train", with_answer=False)[0]
    assert [m["role"] for m in no_answer["messages"]] == ["user"]


def test_bad_answer_index(tmp_path) -> None:
    root = _world(tmp_path, {"1": _problem(answer=3), "2": _problem()})
    with pytest.raises(ValueError, match=r"problem '1': answer index 3 is outside the 3 choices"):
        ScienceQA(root, "train")
    ds = ScienceQA(root, "train", skip_bad=True)
    assert len(ds) == 1 and ds.summary() == {"records": 1, "skipped_bad": 1}


def test_empty_or_unknown_split(tmp_path) -> None:
    root = _world(tmp_path, {"1": _problem()}, {"train": ["1"], "test": []})
    with pytest.raises(ValueError, match=r"pid_splits.json: split 'test' is empty"):
        ScienceQA(root, "test")
    with pytest.raises(ValueError, match=r"no split 'val'"):
        ScienceQA(root, "val")


def test_missing_and_corrupt_image(tmp_path) -> None:
    root = _world(tmp_path, {"1": _problem(), "2": _problem()}, images=False)
    write_image(root / "images/train/2/image.png")
    with pytest.raises(FileNotFoundError, match=r"problem '1': image .*train/1/image.png not found"):
        ScienceQA(root, "train")
    (root / "images/train/2/image.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = ScienceQA(root, "train", skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1
    assert ds[0] is None  # corrupt file: dropped by the collator and counted there
    write_image(root / "images/train/1/image.png")
    with pytest.raises(ValueError, match=r"problem '2': cannot read image .*image.png"):
        ScienceQA(root, "train")[1]


def test_malformed_problem(tmp_path) -> None:
    root = _world(tmp_path, {"1": _problem(choices="x"), "2": _problem(grade="grade13")})
    with pytest.raises(ValueError, match=r"problem '1': 'choices' must be a list"):
        ScienceQA(root, "train")
    with pytest.raises(ValueError, match=r"no usable records \(2 bad records skipped"):
        ScienceQA(root, "train", skip_bad=True)
