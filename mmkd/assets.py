"""Offline assets for the tiny recipes, the tests and the demo: a synthetic world and tiny models in real folders."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["tiny_assets_command", "prepare_tiny_assets"]


def prepare_tiny_assets(out: str | Path, *, n: int = 240, seed: int = 0, image_size: int = 32,
                        moe: bool = False, clip: bool = False, qwen: bool = False) -> dict[str, Any]:
    """Write everything a tiny recipe needs under ``out``, skipping what is already complete.

    Layout: ``sqa/`` (the synthetic ScienceQA world, its caption and preference pairs, ``sqa/tokenizer``),
    ``models/teacher`` (a tiny LLaVA-class teacher folder), ``models/student-vision`` and
    ``models/student-lm`` (the parts a tiny ``MLLMStudent`` is built from), and with ``clip`` also
    ``models/clip-teacher`` and ``models/clip-student``. Every model is written by ``save_pretrained`` and
    loaded back by path, the code path of a hub id.

    Args:
        out: Output folder.
        n: Problems in the synthetic world.
        seed: Seed of the world and of every random initialisation.
        image_size: Image side in pixels.
        moe: Unused for now; MoE students are made by upcycling in a recipe stage.
        clip: Also write tiny CLIP teacher and student folders.
        qwen: Also write tiny Qwen2.5-VL teacher and student folders (``models/qwen-teacher``, ``models/qwen-student``;
            their tokenizer is the world's plus Qwen-VL's vision tokens).

    Returns:
        The paths written.
    """
    from mmkd.data.synth import synth_sqa
    from mmkd.models.presets import PRESET_SIZES, build_tiny, write_vision_and_lm

    root = Path(out)
    sqa, models = root / "sqa", root / "models"
    stamp = root / ".complete.json"
    wanted = {"n": n, "seed": seed, "image_size": image_size, "clip": clip, "qwen": qwen}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return _paths(root)
    synth_sqa(sqa, n, seed, image_size)
    tokenizer = str(sqa / "tokenizer")
    build_tiny("llava-teacher", str(models / "teacher"), tokenizer=tokenizer, seed=seed, image_size=image_size)
    with tempfile.TemporaryDirectory(prefix="mmkd-parts-") as tmp:
        import shutil

        import torch

        torch.manual_seed(seed + 1)
        sizes = {**PRESET_SIZES["mllm-student"], "image_size": image_size}
        vision, lm = write_vision_and_lm(Path(tmp), tokenizer, sizes)
        for src, dst in ((vision, models / "student-vision"), (lm, models / "student-lm")):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
    if clip:
        build_tiny("clip-teacher", str(models / "clip-teacher"), tokenizer=tokenizer, seed=seed)
        build_tiny("clip-student", str(models / "clip-student"), tokenizer=tokenizer, seed=seed + 1)
    if qwen:
        build_tiny("qwen-vl-teacher", str(models / "qwen-teacher"), tokenizer=tokenizer, seed=seed)
        build_tiny("qwen-vl-student", str(models / "qwen-student"), tokenizer=tokenizer, seed=seed + 1)
    stamp.write_text(json.dumps(wanted))
    return _paths(root)


def _paths(root: Path) -> dict[str, Any]:
    return {"root": str(root), "sqa": str(root / "sqa"), "tokenizer": str(root / "sqa" / "tokenizer"),
            "teacher": str(root / "models" / "teacher"), "student_vision": str(root / "models" / "student-vision"),
            "student_lm": str(root / "models" / "student-lm")}


def tiny_assets_command(out: str = "data/tiny", n: int = 240, seed: int = 0, clip: bool = False,
                        qwen: bool = False) -> dict[str, Any]:
    """Write the synthetic world and tiny model folders that the recipes in recipes/tiny/ and debug.yaml use.

    Args:
        out: Output folder (the recipes' data_root).
        n: Problems in the synthetic world.
        seed: Seed of the world and the tiny models.
        clip: Also write tiny CLIP teacher and student folders.
        qwen: Also write tiny Qwen2.5-VL teacher and student folders.

    Returns:
        The paths written.
    """
    paths = prepare_tiny_assets(out, n=n, seed=seed, clip=clip, qwen=qwen)
    for key, value in paths.items():
        print(f"{key:15s} {value}")
    return paths
