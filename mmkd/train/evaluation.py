"""Per-stage ScienceQA evaluation: the student of a stage scored as ``mmkd eval`` scores it, at the stage's end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = ["ScienceQAEval"]


class ScienceQAEval(L.Callback):
    """Score the student on a ScienceQA-layout split when its stage ends (and every N steps if asked).

    Each rank answers its own shard of the questions; :class:`mmkd.eval.metric.ScienceQAAccuracy` sums the
    counts across ranks, so the numbers equal a single-process evaluation. Results land in
    ``RUN_DIR/eval/STAGE/SPLIT-MODE/`` (``metrics.json`` and ``answers.jsonl``, as ``mmkd eval`` writes them) and
    in the stage's metrics as ``sqa/accuracy``, ``sqa/IMG``, ...

    Args:
        root: ScienceQA-layout folder (problems.json, pid_splits.json, images/).
        out_dir: Where to write (``RunDir.eval_dir(stage, split, mode)``).
        split: Split to score (never the training split: use ``val`` while tuning, ``test`` for reports).
        mode: ``likelihood`` (fast, robust for tiny models) or ``generate``.
        limit: Score only the first N questions.
        batch_size: Questions per batch.
        every_n_steps: Also score every N optimizer steps (0: only at the end).
    """

    def __init__(self, root: str, out_dir: Path, split: str = "val", mode: str = "likelihood",
                 limit: int | None = None, batch_size: int = 16, every_n_steps: int = 0):
        from mmkd.eval.loop import MODES

        if mode not in MODES:
            raise ValueError(f"sqa_eval.mode={mode!r}: expected one of {', '.join(MODES)}")
        self.root, self.out_dir, self.split, self.mode = root, Path(out_dir), split, mode
        self.limit, self.batch_size, self.every = limit, batch_size, every_n_steps
        self.last: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step and step % self.every == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        from torch.utils.data import Subset

        from mmkd.data import ScienceQA
        from mmkd.eval.answers import AnswerWriter
        from mmkd.eval.categories import CATEGORIES
        from mmkd.eval.loop import run_evaluation
        from mmkd.eval.metric import ScienceQAAccuracy
        from mmkd.eval.report import write_json

        dataset = ScienceQA(self.root, self.split, with_answer=False)
        n = len(dataset) if self.limit is None else min(self.limit, len(dataset))
        shard = Subset(dataset, list(range(trainer.global_rank, n, trainer.world_size)))
        metric = ScienceQAAccuracy(categories=CATEGORIES).to(pl_module.device)
        folder = self.out_dir
        name = "answers.jsonl" if trainer.world_size == 1 else f"answers.rank{trainer.global_rank}.jsonl"
        student = pl_module.student
        was_training = student.training
        student.eval()
        with torch.no_grad(), AnswerWriter(folder / name, f"{pl_module.stage}@{trainer.global_step}") as writer:
            run_evaluation(student, shard, writer, metric, mode=self.mode, batch_size=self.batch_size,
                           progress=False)
        student.train(was_training)
        report = {"mode": self.mode, "step": trainer.global_step, **metric.report()}
        if trainer.is_global_zero:
            write_json(report, folder / "metrics.json")
        trainer.callback_metrics["sqa/accuracy"] = torch.tensor(float(report["accuracy"] or 0.0))
        for cat, values in (report.get("categories") or {}).items():
            if values.get("accuracy") is not None:
                trainer.callback_metrics[f"sqa/{cat}"] = torch.tensor(float(values["accuracy"]))
        self.last = report
        return report
