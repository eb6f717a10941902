"""Callbacks: crash-safe step checkpoints and test-only fault injection."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L

from mmkd.modules.distill import _fault

__all__ = ["StepCheckpoint", "fsync_path"]


def fsync_path(path: Path) -> None:
    """fsync a file, or every file of a folder and the folder itself."""
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                _fsync(child)
    _fsync(path)


def _fsync(path: Path) -> None:
    """fsync one file or directory entry (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        stage: The stage name (for fault injection).
    """

    def __init__(self, folder: Path, every_n_steps: int, keep: int, on_saved: Callable[[Path, int], None],
                 stage: str):
        self.folder = Path(folder)
        self.every = max(1, every_n_steps)
        self.keep = max(1, keep)
        self.on_saved = on_saved
        self.stage = stage
        self._last_saved = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_saved or step == 0:
            return
        if _fault("kill", self.stage, step):
            os.kill(os.getpid(), signal.SIGKILL)
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
            if _fault("kill_in_checkpoint", self.stage, step):
                os.kill(os.getpid(), signal.SIGKILL)
            fsync_path(tmp)
            _remove(final)
            os.replace(tmp, final)
            _fsync(self.folder)
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
