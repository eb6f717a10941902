from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmkd.data.collate import MultimodalCollator
from mmkd.data.scienceqa import ScienceQA
from mmkd.data.tokenizer import build_tokenizer
from mmkd.eval.commands import score_command
from mmkd.eval.loop import letter_token_ids
from mmkd.models import LlavaModel
from mmkd.models.presets import build_tiny
from mmkd.train.evaluate import evaluate_command


def _memorise(folder: Path, root: Path, out: Path, steps: int = 30) -> None:
    """Fit the tiny student to the 6 answers (a few seconds), so that the end-to-end scores are known: 100%."""
    model = LlavaModel(str(folder))
    dataset = ScienceQA(root, "test")
    batch = MultimodalCollator.for_models(model, train=True)([dataset[i] for i in range(len(dataset))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        output = model(**batch.inputs.kwargs())
        logits = output.logits()[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def tiny(
    tmp_path_factory: pytest.TempPathFactory, sqa_problems: dict[str, dict], write_sqa: Callable[[Path], Path]
) -> dict[str, Path]:
    """A tiny student (random, and fitted to the split) saved as plain Llava folders, and a synthetic ScienceQA
    split with images."""
    tmp = tmp_path_factory.mktemp("eval-loop")
    texts = [f"{p['question']} " + " ".join(p["choices"]) for p in sqa_problems.values()]
    build_tokenizer(tmp / "tok", texts=texts * 3 + ["Answer with the option's letter. Context: A. B. C. D."],
                    vocab_size=400)
    build_tiny("mllm-student", str(tmp / "student"), tokenizer=str(tmp / "tok"), seed=3)
    root = write_sqa(tmp / "sqa")
    for pid, p in sqa_problems.items():
        if p["image"]:
            folder = root / "images" / "test" / pid
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), (int(pid) * 40, 90, 200)).save(folder / "image.png")
    torch.manual_seed(0)
    _memorise(tmp / "student", root, tmp / "fitted")
    return {"student": tmp / "student", "fitted": tmp / "fitted", "sqa": root}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_end_to_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "gen"
    report = evaluate_command(str(tiny["student"]), f"sqa:{tiny['sqa']}", out=str(out), batch_size=4,
                              max_new_tokens=4)
    lines = _lines(out / "answers.jsonl")
    assert [line["question_id"] for line in lines] == ["1", "2", "3", "4", "5", "6"]
    assert all(set(line) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for line in lines)
    assert lines[0]["model_id"] == "student"
    assert lines[0]["prompt"] == (
        "<image>\nWhich is red?\nA. apple\nB. sky\nAnswer with the option's letter from the given choices directly."
    )
    assert lines[1]["prompt"].startswith("Context: Read.\nWhich is a verb?\n")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == report and metrics["mode"] == "generate" and metrics["count"] == 6
    # The scores written equal a fresh scoring of the answer file written.
    rescored = score_command(str(out / "answers.jsonl"), data=f"sqa:{tiny['sqa']}", out=str(tmp_path / "re"))
    assert rescored == {k: v for k, v in report.items() if k != "mode"}
    assert metrics["missing"] == 0
    # Batch size does not change greedy answers (left padding is handled).
    evaluate_command(str(tiny["student"]), f"sqa:{tiny['sqa']}", out=str(tmp_path / "b1"), batch_size=1,
                     max_new_tokens=4, limit=3)
    assert [x["text"] for x in _lines(tmp_path / "b1" / "answers.jsonl")] == [x["text"] for x in lines[:3]]


def test_generate_scores_a_fitted_student(tiny: dict[str, Path], tmp_path: Path) -> None:
    report = evaluate_command(str(tiny["fitted"]), f"sqa:{tiny['sqa']}", out=str(tmp_path), batch_size=4,
                              max_new_tokens=4)
    assert [x["text"] for x in _lines(tmp_path / "answers.jsonl")] == ["A", "A", "A", "B", "A", "B"]
    assert (report["accuracy"], report["correct"], report["failed_parses"]) == (100.0, 6, 0)
    assert all(row["accuracy"] == 100.0 and row["count"] > 0 for row in report["categories"].values())


def test_likelihood_picks_the_most_likely_letter(
    tiny: dict[str, Path], tmp_path: Path, sqa_problems: dict[str, dict]
) -> None:
    out = tmp_path / "ll"
    report = evaluate_command(str(tiny["student"]), f"sqa:{tiny['sqa']}", out=str(out), batch_size=3,
                              mode="likelihood")
    assert report["mode"] == "likelihood" and report["count"] == 6 and report["failed_parses"] == 0
    lines = _lines(out / "answers.jsonl")
    model = LlavaModel(str(tiny["student"])).eval()
    letter_ids = letter_token_ids(model)
    collator = MultimodalCollator.for_models(model, train=False)
    dataset = ScienceQA(tiny["sqa"], "test", with_answer=False)
    for i, line in enumerate(lines):
        # Unbatched, unpadded reference: log-softmax at the last prompt position, over this question's letters.
        batch = collator([dataset[i]])
        with torch.no_grad():
            out_i = model(**batch.inputs.kwargs())
        logprobs = torch.log_softmax(out_i.logits(out_i.last_hidden[:, -1]), dim=-1)[0, letter_ids]
        n = len(sqa_problems[line["question_id"]]["choices"])
        assert line["text"] == "ABCDE"[int(logprobs[:n].argmax())]
        written = [line["metadata"]["logprobs"][letter] for letter in "ABCDE"[:n]]
        assert written == pytest.approx(logprobs[:n].tolist(), abs=1e-4)
    correct = sum(line["text"] == "ABCDE"[sqa_problems[line["question_id"]]["answer"]] for line in lines)
    assert report["correct"] == correct


def test_run_directory_and_question_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    # A run directory whose last finished stage holds the student; a LLaVA question file as data.
    run = tmp_path / "run"
    (run / "stages" / "sft").mkdir(parents=True)
    (run / "stages" / "sft" / "student").symlink_to(tiny["student"], target_is_directory=True)
    manifest = {"stages": {"sft": {"status": "done"}, "dft": {"status": "pending"}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    entries = [
        {"id": "1", "image": "1/image.png",
         "conversations": [{"from": "human", "value": "<image>\nWhich is red?\nA. apple\nB. sky"},
                           {"from": "gpt", "value": "A"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Context: Read.\nWhich is a verb?\nA. run\nB. blue"},
                                      {"from": "gpt", "value": "A"}]},
    ]
    questions = tiny["sqa"] / "llava_test.json"  # LLaVA's layout: images/test/<pid>/ next to it
    questions.write_text(json.dumps(entries))
    report = evaluate_command(str(run), f"llava:{questions}", mode="likelihood", batch_size=2)
    out = run / "eval" / "sft" / "test-likelihood"
    assert json.loads((out / "metrics.json").read_text()) == report
    assert set(report["categories"]) == {"TXT", "IMG", "NO"} and report["categories"]["IMG"]["count"] == 1
    assert {x["model_id"] for x in _lines(out / "answers.jsonl")} == {"run/sft"}
