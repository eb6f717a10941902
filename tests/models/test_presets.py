"""Tiny presets: real folders, loaded by the same classes that load hub models."""

from __future__ import annotations

import json

import pytest

from mmkd.models import LlavaModel, MLLMStudent
from mmkd.models.presets import build_tiny


def test_presets_write_loadable_folders(tiny_dirs) -> None:
    teacher = LlavaModel(str(tiny_dirs["llava-teacher"]))
    student = MLLMStudent.from_pretrained(tiny_dirs["mllm-student"])
    moe = MLLMStudent.from_pretrained(tiny_dirs["moe-student"])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(teacher) > n(student)
    assert teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab() == moe.tokenizer.get_vocab()
    assert teacher.num_image_tokens == student.num_image_tokens == moe.num_image_tokens == 16
    assert set(moe.parts()) == {"vision_tower", "projector", "language_model", "ffn", "experts", "router"}
    cfg = json.loads((tiny_dirs["clip-teacher"] / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 32


def test_sizes_override_and_errors(tmp_path, tokenizer_dir) -> None:
    out = build_tiny("mllm-student", str(tmp_path / "s"), tokenizer=tokenizer_dir, hidden=32, layers=1)
    s = MLLMStudent.from_pretrained(out)
    assert s.hf.config.text_config.hidden_size == 32 and s.hf.config.text_config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown kind 'gpt'"):
        build_tiny("gpt", str(tmp_path / "x"), tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match=r"unknown sizes \['depth'\]"):
        build_tiny("llava-teacher", str(tmp_path / "x"), tokenizer=tokenizer_dir, depth=3)
