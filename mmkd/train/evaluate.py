"""``mmkd eval MODEL``: a run's student (through its run directory), a student folder or any LLaVA-class model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmkd.train.rundir import RunDir

__all__ = ["evaluate_command", "resolve_model"]


def resolve_model(model: str, stage: str | None = None) -> tuple[Path | str, str, RunDir | None]:
    """Where the weights of ``MODEL`` are: a run directory's stage student, a student folder or a hub id.

    Args:
        model: A run directory (has manifest.json), a model folder, or a hub id.
        stage: With a run directory, the stage whose student to take (default: the last one done).

    Returns:
        ``(folder or hub id, model_id for answer lines, the run directory or None)``.
    """
    path = Path(model)
    run = RunDir(path)
    if run.exists():
        folder, stage = run.finished_student(stage)
        return folder, f"{path.resolve().name}/{stage}", run
    if stage is not None:
        raise ValueError(f"--stage {stage}: {model} is not a run directory (no manifest.json)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: expected a run directory (manifest.json) or a model folder (config.json)")
    return (path if path.is_dir() else model), (path.resolve().name if path.is_dir() else model), None


def _load_model(where: Path | str) -> Any:
    import torch

    from mmkd.models import ImageTextModel

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    loaded = ImageTextModel.from_pretrained(str(where), dtype=dtype)
    if torch.cuda.is_available():
        loaded = loaded.to("cuda")
    loaded.eval()
    return loaded


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
    from mmkd.eval.commands import evaluate_model, parse_data_spec
    from mmkd.eval.loop import MODES

    if mode not in MODES:
        raise ValueError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    parse_data_spec(data)  # a bad --data is a one-line error before anything loads
    where, model_id, run = resolve_model(model, stage)
    if out is not None:
        out_dir = Path(out)
    elif run is not None:
        out_dir = run.eval_dir(model_id.rsplit("/", 1)[-1], split, mode)
    else:
        out_dir = Path("eval") / model_id / f"{split}-{mode}"
    return evaluate_model(lambda: _load_model(where), data, out_dir, model_id, split=split, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, limit=limit, mode=mode)
