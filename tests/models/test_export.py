"""Export: a complete Hugging Face folder that plain transformers loads and answers with, plus a model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkd.models import MLLMStudent
from mmkd.models.export import export_student

# Runs in a fresh interpreter with transformers only: no mmkd import anywhere.
_PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

batch_file, out_file, *folders = sys.argv[1:]
batch = torch.load(batch_file)
results = {}
for folder in folders:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**batch).logits
    image = Image.new("RGB", (40, 40), "red")
    enc = processor(images=[image], text="<image>\nDescribe the image.", return_tensors="pt")
    pipe = pipeline("image-text-to-text", model=folder)
    answer = pipe(images=image, text="<image>\nDescribe the image.", max_new_tokens=4)
    results[folder] = {"logits": logits, "answer": answer,
                       "image_tokens": int((enc["input_ids"] == model.config.image_token_id).sum())}
results["mmkd_imported"] = any(m.startswith("mmkd") for m in sys.modules)
torch.save(results, out_file)
"""


def _plain_run(folders: list[Path], batch: dict, tmp_path: Path) -> dict:
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN_TRANSFORMERS)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"), *map(str, folders)],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return torch.load(tmp_path / "out.pt", weights_only=False)


def test_exported_students_run_in_plain_transformers(tiny_dirs, batch, tmp_path) -> None:
    kinds = ("mllm-student", "moe-student")
    folders, expected = [], {}
    for kind in kinds:
        out_dir = export_student(
            str(tiny_dirs[kind]),
            str(tmp_path / kind),
            recipe={"name": "llava_kd", "run_dir": "runs/llava_kd", "stages": {"dpt": {}, "sft": {}, "dft": {}}},
            metrics={"dft": {"sqa/accuracy": 0.4321, "sqa/IMG": 0.5}},
            teacher="llava-hf/llava-1.5-7b-hf",
        )
        folders.append(out_dir)
        names = {p.name for p in out_dir.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "README.md",
            "tokenizer_config.json",
            "processor_config.json",
            "chat_template.jinja",
            "mmkd_recipe.yaml",
        } <= names
        config = json.loads((out_dir / "config.json").read_text())
        assert config["architectures"] == ["LlavaForConditionalGeneration"]
        assert config["text_config"].get("output_router_logits", False) is False
        card = (out_dir / "README.md").read_text()
        assert "pipeline_tag: image-text-to-text" in card and "base_model: llava-hf/llava-1.5-7b-hf" in card
        assert "Recipe: `llava_kd`" in card and "| dft | sqa/accuracy | 0.4321 |" in card
        assert "Stages: dpt, sft, dft" in card
        student = MLLMStudent.from_pretrained(tiny_dirs[kind]).eval()
        with torch.no_grad():
            expected[str(out_dir)] = student(**batch).logits()
    got = _plain_run(folders, batch, tmp_path)
    assert got["mmkd_imported"] is False
    for folder, logits in expected.items():
        torch.testing.assert_close(got[folder]["logits"], logits, rtol=1e-5, atol=1e-5)
        assert got[folder]["image_tokens"] == 16
        assert isinstance(got[folder]["answer"][0]["generated_text"], str)
    assert "qwen2_moe" in json.loads((folders[1] / "config.json").read_text())["text_config"]["model_type"]


def test_export_without_run_information(tiny_dirs, tmp_path) -> None:
    out = export_student(str(tiny_dirs["mllm-student"]), str(tmp_path / "e"))
    card = (out / "README.md").read_text()
    assert "Teacher: not recorded" in card and "No evaluation results" in card
    assert not (out / "mmkd_recipe.yaml").exists()


def test_export_missing_student(tmp_path) -> None:
    from mmkd.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="student_dir=.*no such folder"):
        export_student(str(tmp_path / "nope"), str(tmp_path / "out"))
