"""Shared tiny models for the model tests: built once per session into real folders, loaded by path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmkd.data.tokenizer import build_tokenizer
from mmkd.models.presets import build_tiny

_TEXTS = [
    "Describe the image. The image shows a red circle on the left and a blue square on the right.",
    "Question: Which shape is shown? Options: A. circle B. square C. triangle. Answer with the option's letter.",
    "The answer is A. The answer is B. The answer is C. What colour is the shape? It is green.",
] * 4


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out, texts=_TEXTS, vocab_size=320)
    return str(out)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: str) -> dict[str, Path]:
    """One folder per preset kind, written by save_pretrained."""
    root = tmp_path_factory.mktemp("tiny")
    kinds = ("llava-teacher", "mllm-student", "moe-student", "clip-teacher", "clip-student", "onevision-teacher")
    return {k: build_tiny(k, str(root / k), tokenizer=tokenizer_dir, seed=i) for i, k in enumerate(kinds)}


@pytest.fixture(scope="session")
def batch(tokenizer_dir: str) -> dict[str, torch.Tensor]:
    """A collated-style batch: 2 samples, one image each, ``<image>`` expanded to 16 tokens, right padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = [
        [image_id] * 16 + tok("Describe the image.")["input_ids"],
        [image_id] * 16 + tok("Which shape?")["input_ids"],
    ]
    width = max(map(len, rows))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    g = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
