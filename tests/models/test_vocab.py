"""Vocabulary alignment between teacher and student heads padded to different sizes."""

from __future__ import annotations

import pytest
import torch

from mmkd.models import LlavaModel, MLLMStudent, align_vocab


def test_padded_heads_align_to_tokenizer_length(tiny_dirs, batch) -> None:
    teacher = LlavaModel(str(tiny_dirs["llava-teacher"]))
    student = MLLMStudent.from_pretrained(tiny_dirs["mllm-student"])
    n = len(student.tokenizer)
    # Pad the heads as released checkpoints do (e.g. 151,936 vs 152,064 rows for one tokenizer).
    teacher.hf.resize_token_embeddings(n + 64)
    student.hf.resize_token_embeddings(n + 8)
    assert teacher(**batch).head_weight.shape[0] != student(**batch).head_weight.shape[0]
    assert align_vocab(teacher, student) == n
    t, s = teacher(**batch), student(**batch)
    assert t.logits().shape[-1] == s.logits().shape[-1] == n
    # The kept rows are the real tokens' rows, unchanged.
    torch.testing.assert_close(s.head_weight, student.hf.lm_head.weight[:n])


def test_different_tokenizers_are_refused(tiny_dirs) -> None:
    teacher = LlavaModel(str(tiny_dirs["llava-teacher"]))
    student = MLLMStudent.from_pretrained(tiny_dirs["mllm-student"])
    student.processor.tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match=r"teacher tokenizer .* and student tokenizer .* differ") as info:
        align_vocab(teacher, student)
    assert "\n" not in str(info.value)
