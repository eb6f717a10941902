"""``mmkd eval`` and ``mmkd eval score``: typed command functions whose docstrings are the CLI help."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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


def resolve_model(model: str, stage: str | None = None) -> tuple[Path | str, str, Path | None]:
    """Where the weights of ``MODEL`` are: a run directory's stage student, a student folder or a LLaVA model.

    Args:
        model: A run directory (has manifest.json), a model folder, or a hub id.
        stage: With a run directory, the stage whose student to take (default: the last one done).

    Returns:
        ``(folder or hub id, model_id for answer lines, run directory or None)``.
    """
    path = Path(model)
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            stages: dict[str, Any] = manifest["stages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{manifest_path}: expected a JSON object with 'stages' (an mmkd run manifest)") from None
        done = [name for name, entry in stages.items() if isinstance(entry, dict) and entry.get("status") == "done"]
        if stage is None:
            if not done:
                raise ValueError(f"{manifest_path}: no stage is done yet; expected at least one finished stage")
            stage = done[-1]
        elif stage not in stages:
            raise ValueError(f"--stage {stage}: {manifest_path} has stages {list(stages)}")
        elif stage not in done:
            raise ValueError(f"--stage {stage}: the stage is {stages[stage].get('status')}, expected done")
        folder = path / (stages[stage].get("student") or f"stages/{stage}/student")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: stage {stage!r} is done but its student folder has no config.json")
        return folder, f"{path.resolve().name}/{stage}", path
    if stage is not None:
        raise ValueError(f"--stage {stage}: {model} is not a run directory (no manifest.json)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: expected a run directory (manifest.json) or a model folder (config.json)")
    return (path if path.is_dir() else model), (path.resolve().name if path.is_dir() else model), None


def _load_model(where: Path | str, from_run: bool) -> Any:
    import torch

    from mmkd.models import LlavaModel, MLLMStudent

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    model = MLLMStudent.from_pretrained(where, dtype=dtype) if from_run else LlavaModel(str(where), dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model


def _open_dataset(data: str, split: str) -> tuple[Any, tuple[str, ...], str]:
    from mmkd.data.llava import LlavaQuestionFile
    from mmkd.data.scienceqa import ScienceQA

    kind, path, images = parse_data_spec(data)
    if kind == "sqa":
        return ScienceQA(path, split, with_answer=False), CATEGORIES, f"{path} ({split})"
    dataset = LlavaQuestionFile(path, images or _question_file_images(path, split))
    return dataset, PROMPT_CATEGORIES, str(path)


def evaluate_command(
    model: str,
    data: str,
    split: str = "test",
    out: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    limit: int | None = None,
    mode: str = "generate",
    stage: str | None = None,
) -> dict[str, Any]:
    """Evaluate a student or teacher on a ScienceQA-style benchmark and score it as LLaVA's scorer does.

    Prompts follow LLaVA-1.5 (image, context, question, lettered options, "Answer with the option's letter
    from the given choices directly."). Writes answers.jsonl (LLaVA's answer-file format, one line per
    question as it is answered) and metrics.json, and prints the table.

    Args:
        model: A run directory (its last finished stage, or --stage), an exported student folder, or any
            LLaVA-class model folder or hub id (to score the teacher the same way).
        data: ``sqa:DIR`` (ScienceQA layout: problems.json, pid_splits.json, images/) or
            ``llava:QUESTIONS.json[:IMAGE_DIR]`` (LLaVA's question file; images default to
            ``images/<split>`` next to it).
        split: The ScienceQA split (a key of pid_splits.json).
        out: Output folder (default: ``RUN/eval/STAGE/SPLIT-MODE`` for a run, else ``eval/NAME/SPLIT-MODE``).
        batch_size: Questions per batch.
        max_new_tokens: Most tokens generated per answer (LLaVA's scorer needs only the letter).
        limit: Evaluate only the first N questions (a quick look; not comparable with published numbers).
        mode: ``generate`` (greedy decoding, parsed like LLaVA) or ``likelihood`` (the option letter with the
            highest log-probability after the prompt; fast and robust for tiny models, reported separately).
        stage: With a run directory, the stage to evaluate.

    Returns:
        The metrics written to metrics.json (with ``mode``).
    """
    if mode not in MODES:
        raise ValueError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    where, model_id, run_dir = resolve_model(model, stage)
    dataset, categories, source = _open_dataset(data, split)
    if out is None:
        base = run_dir / "eval" / model_id.rsplit("/", 1)[-1] if run_dir is not None else Path("eval") / model_id
        out_dir = base / f"{split}-{mode}"
    else:
        out_dir = Path(out)
    console = Console()
    loaded = _load_model(where, run_dir is not None)
    metric = ScienceQAAccuracy(categories=categories, sync_on_compute=False)
    start = time.perf_counter()
    with AnswerWriter(out_dir / "answers.jsonl", model_id) as writer:
        stats = run_evaluation(
            loaded, dataset, writer, metric, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
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
