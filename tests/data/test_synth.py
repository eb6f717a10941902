import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from mmkd.data.commands import synth_sqa_command
from mmkd.data.llava import CaptionPairs, PreferencePairs
from mmkd.data.scienceqa import ScienceQA, validate_problem
from mmkd.data.synth import IMAGE_TEMPLATES, generate, synth_sqa


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_files_other_seed_differs(tmp_path) -> None:
    synth_sqa(tmp_path / "a", 60, seed=3, tokenizer=False)
    synth_sqa(tmp_path / "b", 60, seed=3, tokenizer=False)
    synth_sqa(tmp_path / "c", 60, seed=4, tokenizer=False)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b and len(a) > 30
    assert a["problems.json"] != c["problems.json"]


def test_world_is_valid_scienceqa_and_readable(tmp_path) -> None:
    summary = synth_sqa_command(str(tmp_path), n=80, seed=0, image_size=32)
    assert summary["train"]["problems"] + summary["val"]["problems"] + summary["test"]["problems"] == 80
    problems = json.loads((tmp_path / "problems.json").read_text())
    for pid, p in problems.items():
        validate_problem(p, pid)
        assert p["lecture"] and p["solution"] and p["task"] == "closed choice"
    for split in ("train", "val", "test"):
        ds = ScienceQA(tmp_path, split)  # strict: any bad record or missing image would raise
        assert len(ds) == summary[split]["problems"] and not ds.skipped
        with_image = [ds[i] for i in range(len(ds)) if ds[i]["meta"]["has_image"]]
        assert with_image and all(r["images"][0].size == (32, 32) for r in with_image)
    caps = CaptionPairs(tmp_path / "captions.json", tmp_path / "images")
    prefs = PreferencePairs(tmp_path / "preference.json", tmp_path / "images")
    assert len(caps) == summary["captions"] and len(prefs) == summary["train"]["problems"]
    pair, first = prefs[0], ScienceQA(tmp_path, "train")[0]
    assert pair["id"] == first["id"] and pair["chosen"] != pair["rejected"]
    assert pair["chosen"].endswith(f"The answer is {first['answer']}.")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tok.image_token == "<image>" and 1000 < len(tok) <= 2048


def test_coverage_of_subjects_grades_and_kinds() -> None:
    items = generate(3000, seed=0)
    problems = [it.problem for it in items]
    assert {p["subject"] for p in problems} == {"natural science", "social science", "language science"}
    assert {int(p["grade"][5:]) for p in problems} == set(range(1, 13))
    kinds = Counter((bool(p["image"]), bool(p["hint"])) for p in problems)
    assert all(kinds[k] > 100 for k in [(True, False), (True, True), (False, True), (False, False)])
    assert {len(p["choices"]) for p in problems} >= {2, 3, 4}


def test_text_only_baseline_is_near_chance_on_image_questions() -> None:
    items = generate(4000, seed=1)
    train, test = items[:3000], items[3000:]
    # Majority answer per (template, question text): the best a model that ignores the image can learn from text.
    votes: dict[tuple[str, str], Counter] = {}
    for it in train:
        p = it.problem
        votes.setdefault((it.template, p["question"]), Counter())[p["choices"][p["answer"]]] += 1
    hits, chance, n = 0.0, 0.0, 0
    for it in test:
        if it.template not in IMAGE_TEMPLATES:
            continue
        p = it.problem
        counts = votes.get((it.template, p["question"]), Counter())
        ranked = sorted(p["choices"], key=lambda c: (-counts[c], p["choices"].index(c)))
        hits += ranked[0] == p["choices"][p["answer"]]
        chance += 1 / len(p["choices"])
        n += 1
    assert n > 400
    accuracy, chance = hits / n, chance / n
    assert accuracy < chance + 0.05, (accuracy, chance)
    # the same baseline does learn the text-only knowledge questions, so the world is learnable from text there
    text_hits = text_n = 0
    for it in test:
        if it.template in ("element", "conductor"):
            p = it.problem
            counts = votes.get((it.template, p["question"]), Counter())
            text_hits += max(p["choices"], key=lambda c: counts[c]) == p["choices"][p["answer"]]
            text_n += 1
    assert text_hits / text_n > 0.5


def test_fixed_options_keep_each_family_option_list_and_image_questions_need_the_image() -> None:
    items = generate(4000, seed=1, fixed_options=True)
    by_family: dict[str, set[tuple[str, ...]]] = {}
    for it in items:
        by_family.setdefault(it.template, set()).add(tuple(it.problem["choices"]))
    # every family: one option list, in one order (position: one per axis), at most 5 options
    assert set(by_family) == set(IMAGE_TEMPLATES) | {"animals", "conductor", "element", "dictionary", "word_class",
                                                       "sum_hint", "reading_hint"}
    for name, lists in by_family.items():
        assert len(lists) == (2 if name == "position" else 1), (name, lists)
        assert all(2 <= len(options) <= 5 for options in lists)
    colour = [it for it in items if it.template == "colour"]
    # the letter is a fixed function of the content: the colour drawn in the scene
    assert all(it.problem["choices"][it.problem["answer"]] == it.scene["objects"][0]["colour"] for it in colour)
    counts = Counter(it.problem["answer"] for it in colour)
    assert len(counts) == 5 and min(counts.values()) > 0.1 * len(colour)
    # a text-only majority vote per (family, question text) stays at chance on image questions
    train, test = items[:3000], items[3000:]
    votes: dict[tuple[str, str], Counter] = {}
    for it in train:
        votes.setdefault((it.template, it.problem["question"]), Counter())[it.problem["answer"]] += 1
    hits = chance = n = 0.0
    for it in test:
        if it.template in IMAGE_TEMPLATES:
            p = it.problem
            counts = votes.get((it.template, p["question"]), Counter())
            hits += max(range(len(p["choices"])), key=lambda i: (counts[i], -i)) == p["answer"]
            chance += 1 / len(p["choices"])
            n += 1
    assert n > 400 and hits / n < chance / n + 0.05, (hits / n, chance / n)


def test_fixed_options_default_world_unchanged_and_families_filter(tmp_path) -> None:
    default = [it.problem for it in generate(50, seed=2)]
    assert default == [it.problem for it in generate(50, seed=2, fixed_options=False)]
    assert default != [it.problem for it in generate(50, seed=2, fixed_options=True)]
    only = generate(40, seed=0, fixed_options=True, families=["colour", "animals"])
    assert {it.template for it in only} == {"colour", "animals"}
    summary = synth_sqa_command(str(tmp_path), n=30, seed=0, fixed_options=True)
    problems = json.loads((tmp_path / "problems.json").read_text())
    assert len(problems) == summary["problems"] == 30
    for pid, p in problems.items():
        validate_problem(p, pid)
    with pytest.raises(ValueError, match=r"families=\['nope'\]: expected a non-empty subset"):
        generate(10, seed=0, families=["nope"])
