"""Missing models: one line naming the argument, the id or path, and how to provide a local copy."""

from __future__ import annotations

import shutil

import pytest

from mmkd.models import LlavaModel, MLLMStudent, ModelNotFoundError


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read once at import time


def test_hub_id_offline_is_one_line(offline) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        LlavaModel("llava-hf/llava-interleave-qwen-0.5b-hf")
    msg = str(info.value)
    assert "\n" not in msg
    assert "path='llava-hf/llava-interleave-qwen-0.5b-hf'" in msg and "offline" in msg
    assert "--local-dir" in msg and info.value.path == "llava-hf/llava-interleave-qwen-0.5b-hf"


def test_student_parts_offline(offline, tiny_dirs) -> None:
    with pytest.raises(ModelNotFoundError, match=r"^language_model='Qwen/Qwen2-0.5B': cannot load the causal LM"):
        MLLMStudent(str(tiny_dirs["mllm-student"]), "Qwen/Qwen2-0.5B")


def test_incomplete_folder(tiny_dirs, tmp_path) -> None:
    broken = tmp_path / "teacher"
    shutil.copytree(tiny_dirs["llava-teacher"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"folder is incomplete, missing weights") as info:
        LlavaModel(str(broken))
    assert "\n" not in str(info.value)
    (broken / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"missing config.json, weights"):
        LlavaModel(str(broken))


def test_missing_folder_and_bad_options(tmp_path, tiny_dirs) -> None:
    with pytest.raises(ModelNotFoundError, match=r"path='\./no/such/dir': no such folder"):
        LlavaModel("./no/such/dir")
    with pytest.raises(ValueError, match=r"quantize='3bit': expected '8bit', '4bit' or null"):
        LlavaModel(str(tiny_dirs["llava-teacher"]), quantize="3bit")
    with pytest.raises(ValueError, match=r"dtype='float8'"):
        LlavaModel(str(tiny_dirs["llava-teacher"]), dtype="float8")
