"""``mmkd eval score`` and the evaluation of a loaded model on a benchmark (``mmkd eval`` resolves the model in the
app layer, :mod:`mmkd.train.evaluate`, and calls :func:`evaluate_model`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mmkd.eval.answer_key import AnswerKey, load_question_file_key, load_scienceqa_key
from mmkd.eval.answers import AnswerWriter, read_answers
from mmkd.eval.categories import CATEGORIES, PROMPT_CATEGORIES
from mmkd.eval.loop import MODES, run_evaluation
from mmkd.eval.metric import ScienceQAAccuracy
from mmkd.eval.report import print_report, write_json
from mmkd.eval.score import score_answers, unmatched_answers

DATA_KINDS = ("sqa", "llava")


def parse_data_spec(data: str) -> tuple[str, Path, Path | None]:
    """Split ``sqa:DIR``, ``llava:QUESTIONS.json`` or ``llava:QUESTIONS.json:IMAGE_DIR`` into its parts.

    Args:
        data: The ``--data`` value.

    Returns:
        ``(kind, path, image_folder or None)``.
    """
    kind, sep, rest = data.partition(":")
    if not sep or kind not in DATA_KINDS or not rest:
        raise ValueError(f"--data {data!r}: expected sqa:DIR (ScienceQA layout) or llava:QUESTIONS.json[:IMAGE_DIR]")
    if kind == "sqa":
        return kind, Path(rest), None
    path, _, images = rest.partition(".json:")
    if images:
        return kind, Path(path + ".json"), Path(images)
    return kind, Path(rest), None


def _question_file_images(questions: Path, split: str) -> Path:
    # LLaVA's layout: scienceqa/llava_test_CQM-A.json next to scienceqa/images/test/<pid>/image.png.
    candidate = questions.parent / "images" / split
    return candidate if candidate.is_dir() else questions.parent


def _load_key(data: str | None, questions: str | None, split: str) -> AnswerKey:
    if (data is None) == (questions is None):
        raise ValueError("mmkd eval score: give exactly one of --data sqa:DIR and --questions QUESTIONS.json")
    if questions is not None:
        return load_question_file_key(questions)
    kind, path, _ = parse_data_spec(data)
    return load_scienceqa_key(path, split) if kind == "sqa" else load_question_file_key(path)


def score_command(
    answers: str,
    data: str | None = None,
    questions: str | None = None,
    out: str | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Score a LLaVA answer file (one JSON line per question: question_id, text, ...) from any tool.

    Answers are parsed as LLaVA's ScienceQA scorer parses them for LLaVA-1.5's published numbers: the text
    is exactly an option letter; or starts with "X. "; or holds exactly one "The answer is X.". Failed
    parses, letters beyond the question's options and questions without an answer line all count wrong, and
    each kind is counted. With problems.json every ScienceQA category is reported (NAT SOC LAN TXT IMG NO
    G1-6 G7-12); with only a LLaVA question file, TXT, IMG and NO.

    Args:
        answers: The answer file (``.jsonl``).
        data: ``sqa:DIR`` (ScienceQA's problems.json and pid_splits.json) or ``llava:QUESTIONS.json``.
        questions: LLaVA's ScienceQA question file (e.g. llava_test_CQM-A.json), instead of --data.
        out: Folder for metrics.json (default: the answer file's folder).
        split: The split of ``sqa:DIR`` whose questions are scored.

    Returns:
        The metrics written to metrics.json.
    """
    key = _load_key(data, questions, split)
    texts = read_answers(answers)
    report = score_answers(texts, key)
    console = Console()
    stray = unmatched_answers(texts, key)
    if stray:
        console.print(
            f"[yellow]{len(stray)} answer lines name no question of {key.source} (first: {stray[0]!r}); ignored"
        )
    print_report(report, f"{Path(answers).name} on {key.source}", console)
    out_dir = Path(out) if out is not None else Path(answers).resolve().parent
    path = write_json(report, out_dir / "metrics.json")
    console.print(f"wrote {path}")
    return report


def open_dataset(data: str, split: str) -> tuple[Any, tuple[str, ...], str]:
    from mmkd.data.llava import LlavaQuestionFile
    from mmkd.data.scienceqa import ScienceQA

    kind, path, images = parse_data_spec(data)
    if kind == "sqa":
        return ScienceQA(path, split, with_answer=False), CATEGORIES, f"{path} ({split})"
    dataset = LlavaQuestionFile(path, images or _question_file_images(path, split))
    return dataset, PROMPT_CATEGORIES, str(path)


def evaluate_model(
    model: Any,
    data: str,
    out_dir: str | Path,
    model_id: str,
    *,
    split: str = "test",
    batch_size: int = 16,
    max_new_tokens: int = 16,
    limit: int | None = None,
    mode: str = "generate",
) -> dict[str, Any]:
    """Answer a benchmark with a loaded model, score it as LLaVA's scorer does, write answers.jsonl and metrics.json.

    Args:
        model: A loaded :class:`~mmkd.contract.VisionLanguageModel` in eval mode on its device, or a function that
            loads it (called once the benchmark is open, so a bad ``data`` fails before a model loads).
        data: ``sqa:DIR`` or ``llava:QUESTIONS.json[:IMAGE_DIR]``.
        out_dir: Output folder.
        model_id: The model's name in the answer lines.
        split: The ScienceQA split.
        batch_size: Questions per batch.
        max_new_tokens: Most tokens generated per answer.
        limit: Evaluate only the first N questions.
        mode: ``generate`` or ``likelihood``.

    Returns:
        The metrics written to metrics.json (with ``mode``).
    """
    if mode not in MODES:
        raise ValueError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    dataset, categories, source = open_dataset(data, split)
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()
    out_dir = Path(out_dir)
    console = Console()
    metric = ScienceQAAccuracy(categories=categories, sync_on_compute=False)
    start = time.perf_counter()
    with AnswerWriter(out_dir / "answers.jsonl", model_id) as writer:
        stats = run_evaluation(
            model, dataset, writer, metric, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
            limit=limit,
        )
    seconds = time.perf_counter() - start
    report = {"mode": mode, **metric.report()}
    if stats.skipped_too_long:
        console.print(f"[yellow]{stats.skipped_too_long} prompts longer than the model's context: counted missing")
    print_report(report, f"{model_id} on {source}, {mode}", console)
    console.print(f"{stats.questions} questions in {seconds:.1f} s; wrote {writer.path} and {out_dir / 'metrics.json'}")
    write_json(report, out_dir / "metrics.json")
    return report
