"""Qwen2.5-VL (dynamic visual-token counts, ``image_grid_thw``, 3-D rotary positions) as teacher and as student."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from mmkd.contract import VisionLanguageModel
from mmkd.data import MultimodalCollator
from mmkd.models import LlavaModel, MLLMStudent
from mmkd.models.presets import build_tiny

SIZES = [(32, 32), (64, 32), (40, 56)]  # (width, height)


@pytest.fixture(scope="module")
def qwen(tiny_dirs, tmp_path_factory, tokenizer_dir) -> dict[str, LlavaModel]:
    root = tmp_path_factory.mktemp("qwen")
    return {kind: LlavaModel(str(build_tiny(f"qwen-vl-{kind}", str(root / kind), tokenizer=tokenizer_dir, seed=i)))
            for i, kind in enumerate(("teacher", "student"))}


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def _records(n_text: int = 1):
    records = [{"id": f"r{i}", "images": [_image(size, i)],
                "messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                             {"role": "assistant", "content": f"colour {i}"}]} for i, size in enumerate(SIZES)]
    records += [{"id": f"t{j}", "images": [], "messages": [{"role": "user", "content": "Say yes."},
                                                            {"role": "assistant", "content": "yes"}]}
                for j in range(n_text)]
    return records


def test_the_protocol_and_dynamic_counts(qwen):
    teacher = qwen["teacher"]
    assert isinstance(teacher, VisionLanguageModel)
    assert teacher.image_token == "<|image_pad|>"
    assert teacher.image_prompt == "<|vision_start|><|image_pad|><|vision_end|>"
    counts = [teacher.image_token_count(_image(size, 0)) for size in SIZES]
    assert counts == [16, 32, 35] and not teacher._fixed_image_tokens  # (h/8) x (w/8) merged 2x2 patches
    inputs = teacher.image_inputs([_image(SIZES[1], 0)])
    assert set(inputs) == {"pixel_values", "image_grid_thw"} and inputs["image_grid_thw"].tolist() == [[1, 8, 16]]
    assert {"vision_tower", "projector", "language_model", "ffn"} == set(teacher.parts())
    merger = {id(p) for p in teacher.hf.model.visual.merger.parameters()}
    assert merger == {id(p) for p in teacher.parts()["projector"]}  # the merger is the projector, not the tower


def test_a_collated_batch_equals_the_processors_own_inputs(qwen):
    """Our collator (image prompt, expansion, token types from the image tokens) gives what the processor gives."""
    teacher = qwen["teacher"]
    record = _records(0)[1]
    batch = MultimodalCollator.for_models(teacher, None, max_length=256)([record])
    prompt = teacher.tokenizer.apply_chat_template(
        [{"role": "user", "content": record["messages"][0]["content"].replace("<image>", teacher.image_prompt)},
         {"role": "assistant", "content": "colour 1"}], tokenize=False)
    enc = teacher.processor(text=prompt, images=record["images"], return_tensors="pt")
    assert batch.inputs.input_ids.tolist() == enc["input_ids"].tolist()
    assert torch.equal(batch.inputs.images["image_grid_thw"], enc["image_grid_thw"])
    with torch.no_grad():
        ours = teacher(**batch.inputs.kwargs()).logits()
        theirs = teacher.hf(**enc).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # without the token types the model would fall back to 1-D positions: the 3-D rotary positions were used
    with torch.no_grad():
        flat = teacher.hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits
    assert not torch.allclose(ours, flat, atol=1e-4)


@pytest.mark.parametrize("student_kind", ["qwen", "llava"])
def test_distillation_with_a_qwen_teacher(qwen, tiny_dirs, student_kind, make_module):
    teacher = qwen["teacher"]
    if student_kind == "qwen":
        student = qwen["student"]
    else:  # a LLaVA-class student sharing the teacher's vocabulary (the Qwen tokenizer, with its vision tokens)
        student = _llava_student(teacher)
    batch = MultimodalCollator.for_models(student, teacher, max_length=400)(_records())
    if student_kind == "qwen":  # the same processor and counts: the teacher reads the student's inputs
        assert batch.teacher_inputs is None and "image_grid_thw" in batch.inputs.images
    else:  # the teacher's own inputs: its image prompt, its counts, its grid
        assert "image_grid_thw" in batch.teacher_inputs.images and "image_grid_thw" not in batch.inputs.images
    module = make_module(student, teacher, {"lm": 1.0, "kl": 1.0, "mdist": 1.0, "rdist": 1.0},
                         train_parts=["projector", "language_model"], total_steps=1)
    terms = module.compute_losses(batch)
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["kl"]) > 0
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parts()["projector"])
    assert all(p.grad is None for p in teacher.parameters())


def _llava_student(teacher):
    """A tiny MLLM student (CLIP tower + projector + Qwen2 LM) with the Qwen tokenizer (its vision tokens added)."""
    import tempfile
    from pathlib import Path

    from mmkd.models.presets import PRESET_SIZES, write_vision_and_lm

    vision, lm = write_vision_and_lm(Path(tempfile.mkdtemp(prefix="mmkd-qwen-student-")), teacher.path,
                                     PRESET_SIZES["mllm-student"])
    return MLLMStudent(vision, lm, tokenizer=teacher.path)


def test_a_qwen_student_generates_and_exports_to_plain_transformers(qwen, tmp_path):
    student = qwen["student"]
    batch = MultimodalCollator.for_models(student, None, train=False, max_length=256)(_records())
    new = student.generate(batch.inputs, max_new_tokens=3)
    assert new.shape[0] == len(_records())
    from mmkd.models.export import export_student

    folder = tmp_path / "saved"
    student.save_pretrained(folder)
    out = export_student(str(folder), str(tmp_path / "export"))
    with torch.no_grad():
        ref = student(**batch.inputs.kwargs()).logits()[:, -1]
    torch.save({"inputs": batch.inputs.kwargs(), "ref": ref, "types": student.token_types(batch.inputs.input_ids)},
               tmp_path / "probe.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()\n"
        f"probe = torch.load({str(tmp_path / 'probe.pt')!r})\n"
        "with torch.no_grad():\n"
        "    got = m(**probe['inputs'], mm_token_type_ids=probe['types']).logits[:, -1]\n"
        "print(float((got - probe['ref']).abs().max()), type(m).__name__, 'mmkd' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff, name, imported = proc.stdout.split()
    assert float(diff) < 1e-4 and name == "Qwen2_5_VLForConditionalGeneration" and imported == "False"


def test_a_qwen_teacher_and_student_through_dpt_sft_dft(tmp_path):
    import json
    from pathlib import Path

    from mmkd.assets import prepare_tiny_assets
    from mmkd.cli import main

    assets = prepare_tiny_assets(tmp_path / "assets", n=60, seed=0, qwen=True)
    run = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "qwen_vl.yaml"
    assert main(["fit", str(recipe), "--run-dir", str(run), "--data_root", assets["root"], "--trainer.max_steps", "2",
                 "--trainer.enable_progress_bar", "false"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    for stage, terms in (("dpt", ("mdist", "rdist")), ("sft", ("lm",)), ("dft", ("lm", "mdist", "rdist"))):
        entry = manifest["stages"][stage]
        assert entry["status"] == "done" and entry["global_step"] == 2
        assert all(f"train/{t}" in entry["metrics"] for t in terms), (stage, entry["metrics"])
    config = json.loads((run / "stages" / "dft" / "student" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
