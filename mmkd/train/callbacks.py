"""Callbacks: crash-safe step checkpoints, the stage's progress bar, and test-only fault injection (added only when
asked for)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from mmkd.train.rundir import fsync_entry, fsync_path

__all__ = ["FAULT_ENV", "FaultInjection", "StageProgressBar", "StepCheckpoint", "fault_callbacks"]

# Test-only fault injection: ``MMKD_FAULT=kind:stage:step`` with kind ``kill`` (SIGKILL after that optimizer step,
# before its checkpoint), ``kill_in_checkpoint`` (SIGKILL after the checkpoint is written, before it is renamed
# into place), ``raise`` (an exception before that step's first micro-batch) or ``nan`` (that step's first loss term
# becomes NaN).
FAULT_ENV = "MMKD_FAULT"


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar counting the stage's optimizer steps (``step/total``, steps per second, elapsed and
    remaining time, the loss), named after the stage, one bar for the whole stage whatever its epochs."""

    def __init__(self, stage: str) -> None:
        super().__init__(leave=True)
        self.stage = stage

    @property
    def total_train_batches(self) -> int:
        return int(self.trainer.max_steps)

    def _get_train_description(self, current_epoch: int) -> str:
        return f"stage {self.stage}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None and self.progress is not None:
            self.train_progress_bar_id = self._add_task(self.total_train_batches, self._get_train_description(0))
            self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed stage starts where it was
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class StepCheckpoint(L.Callback):
    """Write a resumable checkpoint every N optimizer steps without ever leaving a half-written one in use.

    Each checkpoint gets a fresh step-numbered name (``step-00000120.ckpt``, a folder under DeepSpeed): it is
    written under a temporary name, fsynced and renamed, and only then does ``on_saved`` (the runner's
    manifest update, itself atomic) point at it; older checkpoints are pruned after that. A kill at any
    instant therefore leaves the manifest pointing at a complete checkpoint.

    Args:
        folder: Where the stage's checkpoints go.
        every_n_steps: Interval in optimizer steps.
        keep: How many checkpoints to keep.
        on_saved: Called with ``(path, global_step)`` on rank 0 once a checkpoint is complete.
    """

    def __init__(self, folder: Path, every_n_steps: int, keep: int, on_saved: Callable[[Path, int], None]):
        self.folder = Path(folder)
        self.every = max(1, every_n_steps)
        self.keep = max(1, keep)
        self.on_saved = on_saved
        self.before_publish: Callable[[int], None] | None = None  # a test hook (FaultInjection), else unused
        self._last_saved = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_saved or step == 0:
            return
        if step % self.every == 0 or step >= trainer.max_steps > 0:
            self.save(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved and trainer.global_step > 0:
            self.save(trainer, trainer.global_step)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        final = self.folder / f"step-{step:08d}.ckpt"
        tmp = self.folder / f".tmp-step-{step:08d}.ckpt"
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("mmkd_ckpt_prepare")
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier("mmkd_ckpt_written")
        if trainer.is_global_zero:
            if self.before_publish is not None:
                self.before_publish(step)
            fsync_path(tmp)
            _remove(final)
            os.replace(tmp, final)
            fsync_entry(self.folder)
            self.on_saved(final, step)
            self._prune(final)
        trainer.strategy.barrier("mmkd_ckpt_done")
        self._last_saved = step
        return final

    def _prune(self, newest: Path) -> None:
        done = sorted(p for p in self.folder.glob("step-*.ckpt") if p != newest)
        for old in done[: max(0, len(done) - (self.keep - 1))]:
            _remove(old)
        for stale in self.folder.glob(".tmp-step-*"):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


class FaultInjection(L.Callback):
    """Interruptions at exact steps for the resume tests (see :data:`FAULT_ENV`); never part of a normal run.

    Args:
        kind: ``kill``, ``kill_in_checkpoint``, ``raise`` or ``nan``.
        stage: The stage it fires in.
        step: The optimizer step it fires at (1-based, as the messages count steps).
    """

    def __init__(self, kind: str, stage: str, step: int):
        self.kind, self.stage, self.step = kind, stage, step
        self._restore: Callable[[], None] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.kind == "kill_in_checkpoint":
            for callback in trainer.callbacks:
                if isinstance(callback, StepCheckpoint):
                    callback.before_publish = self._kill_at

    def _kill_at(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        if self.kind == "raise" and step == self.step:
            raise RuntimeError(f"injected failure at step {step}")
        if self.kind == "nan" and step == self.step and self._restore is None:
            losses = pl_module.task.losses

            def poisoned(*args, **kwargs):
                terms = losses(*args, **kwargs)
                first = next(iter(pl_module.weights))
                terms[first] = terms[first] * torch.tensor(float("nan"))
                return terms

            pl_module.task.losses = poisoned
            self._restore = lambda: delattr(pl_module.task, "losses")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
        if self.kind == "kill" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fault_callbacks(stage: str) -> list[L.Callback]:
    """The fault-injection callback for this stage when ``MMKD_FAULT`` asks for one, else nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return []
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("kill", "kill_in_checkpoint", "raise", "nan") or parts[1] != stage:
        return []
    return [FaultInjection(parts[0], parts[1], int(parts[2]))]
