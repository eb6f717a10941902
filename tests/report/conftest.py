"""Run directories for the report tests (synthetic, with every file a run holds) and headless Chromium."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mmkd.eval.answer_key import KeyedQuestion
from mmkd.eval.metric import ScienceQAAccuracy

CHROMIUM = Path("/usr/bin/chromium")

# Eight questions over every category; the answers below get 5 right by LLaVA's rules, 7 by exact match.
QUESTIONS = [
    KeyedQuestion("1", "A", 2, frozenset({"NAT", "G1-6", "IMG"})),
    KeyedQuestion("2", "B", 3, frozenset({"SOC", "G1-6", "TXT"})),
    KeyedQuestion("3", "C", 4, frozenset({"LAN", "G7-12", "NO"})),
    KeyedQuestion("4", "A", 2, frozenset({"NAT", "G7-12", "TXT", "IMG"})),
    KeyedQuestion("5", "B", 2, frozenset({"NAT", "G1-6", "NO"})),
    KeyedQuestion("6", "D", 5, frozenset({"SOC", "G7-12", "IMG"})),
    KeyedQuestion("7", "A", 3, frozenset({"LAN", "G1-6", "NO"})),
    KeyedQuestion("8", "B", 2, frozenset({"NAT", "G7-12", "IMG"})),
]
ANSWERS = ["A", "b", "C. sand", "A", "B", "A", "A", "B."]


def _eval_metrics(answers: list[str | None], mode: str = "generate") -> dict[str, Any]:
    """A ``metrics.json`` as ``mmkd eval`` writes it, from real scoring of ``answers`` to ``QUESTIONS``."""
    metric = ScienceQAAccuracy(sync_on_compute=False)
    metric.update(answers, QUESTIONS)
    return {"mode": mode, **metric.report()}


def _write_run(root: Path, stages: dict[str, dict[str, Any]], evals: dict[str, dict[str, Any]] | None = None,
              manifest: bool = True) -> Path:
    """A run directory with the files ``mmkd fit`` and ``mmkd eval`` write.

    Args:
        root: The run directory.
        stages: ``{stage: {"steps": n, "terms": [...], "lr": bool, "resumed": bool, "logs": bool}}``.
        evals: ``{"stage/split-mode": metrics.json}``.
        manifest: Whether to write manifest.json.
    """
    entries = {}
    for name, spec in stages.items():
        steps, terms = spec.get("steps", 8), spec.get("terms", ["lm", "kl"])
        rows = []
        for step in range(steps):
            row: dict[str, Any] = {"epoch": 0, "step": step}
            for k, term in enumerate(terms):
                row[f"train/{term}"] = (k + 1) * (2.0 + math.exp(-step / 3))
            row["train/loss"] = sum(row[f"train/{t}"] for t in terms)
            if spec.get("lr", True):
                row["train/lr"] = 1e-3 * min(1.0, (step + 1) / 3)
                row["perf/samples_per_s"] = 40.0 + step  # the names the training loop logs
                row["perf/step_time_s"] = 0.2 - 0.01 * step
            rows.append(row)
        if spec.get("resumed"):
            # A resume from the checkpoint of step 4 logs steps 4.. again; the later rows are the run that went on.
            rows += [{**r, "train/loss": r["train/loss"] - 0.5} for r in rows[4:]]
        if steps:
            rows.append({"epoch": 0, "step": steps - 1, "val/loss": 3.0})  # a validation row, other cells empty
        if spec.get("logs", True):
            logs = root / "stages" / name / "logs"
            logs.mkdir(parents=True)
            columns = list(dict.fromkeys(k for r in rows for k in r))
            with (logs / "metrics.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        entries[name] = {
            "status": spec.get("status", "done"), "global_step": steps, "wall_time_s": 1.5 * steps,
            "metrics": {k: v for k, v in rows[-2].items() if k.startswith("train/")} if steps else {},
            "student": f"stages/{name}/student",
            "data": {"samples": 16 * steps, "truncated": 1, "skipped_overflow": 0, "bad": 0, "counted_from_step": 0,
                     "reader": {"records": 144, "skipped_bad": 2}},
        }
    root.mkdir(parents=True, exist_ok=True)
    if manifest:
        data = {"created": "2026-01-01T00:00:00+00:00", "mmkd_version": "0.1.0", "git_commit": None,
                "packages": {"torch": "2.14.1"}, "hardware": {"cpu_count": 2, "cuda_devices": []}, "stages": entries}
        (root / "manifest.json").write_text(json.dumps(data))
    for key, metrics in (evals or {}).items():
        folder = root / "eval" / key
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture(scope="session")
def write_run():
    """``write_run(root, stages, evals=None, manifest=True) -> root``: a synthetic run directory."""
    return _write_run


@pytest.fixture(scope="session")
def eval_metrics():
    """``eval_metrics(answers, mode="generate") -> metrics.json`` for answers to the eight ``QUESTIONS``."""
    return _eval_metrics


@pytest.fixture(scope="session")
def answers() -> list[str]:
    """Answers to the eight ``QUESTIONS``: 5 right by LLaVA's rules, 7 by lmms-eval's exact match."""
    return list(ANSWERS)


def _install_chromium() -> str | None:
    """Install Debian's chromium package; the reason it could not be, or None."""
    if shutil.which("apt-get") is None:
        return "no apt-get to install chromium with"
    if os.geteuid() != 0:
        return "installing chromium needs root (apt-get install -y chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{' '.join(command)} failed: {err}"
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"{' '.join(command)} failed ({done.returncode}): {last[0]}"
    return None if CHROMIUM.is_file() else f"chromium installed but {CHROMIUM} is absent"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Headless Chromium from Debian's package, installed when absent; skips with the reason when it cannot be."""
    if not CHROMIUM.is_file():
        reason = _install_chromium()
        if reason is not None:
            pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
def screenshot(chromium: Path, tmp_path: Path):
    """``screenshot(page) -> PNG path``: the page rendered by headless Chromium at 1280x2000."""

    def take(page: Path) -> Path:
        shot = tmp_path / "screenshot.png"
        command = [
            str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
            page.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
        return shot

    return take
