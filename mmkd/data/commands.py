"""``mmkd data ...`` commands as typed functions: the signature is the CLI schema, the docstring its help."""

from __future__ import annotations

from typing import Any

from mmkd.data.synth import synth_sqa, tokenizer_corpus
from mmkd.data.tokenizer import build_tokenizer


def synth_sqa_command(
    out: str, n: int = 2000, seed: int = 0, image_size: int = 32, fixed_options: bool = False
) -> dict[str, Any]:
    """Write a synthetic ScienceQA-style world, deterministic in the seed.

    Writes problems.json, pid_splits.json and images/<split>/<pid>/image.png (ScienceQA's layout), captions.json
    (caption pairs, LLaVA pretraining layout), preference.json (chosen/rejected pairs) and tokenizer/ (the
    offline tokenizer of the tiny presets).

    Args:
        out: Output folder.
        n: Number of problems (60% train, 20% val, 20% test).
        seed: Seed of the world; the same seed writes identical files.
        image_size: Side of the square images in pixels.
        fixed_options: Every question of a family shows the same options in the same order, so an answer letter
            is a fixed function of the content (the world of `mmkd demo`; see docs/data.md).

    Returns:
        A summary with counts per split.
    """
    return synth_sqa(out, n, seed, image_size, fixed_options=fixed_options)


def tokenizer_command(out: str, vocab_size: int = 2048) -> dict[str, Any]:
    """Train the offline byte-level BPE tokenizer of the tiny presets and save it as a transformers folder.

    Args:
        out: Output folder (load it with AutoTokenizer.from_pretrained).
        vocab_size: Maximum vocabulary size, bytes and special tokens included.

    Returns:
        The folder and the vocabulary size reached.
    """
    tok = build_tokenizer(out, tokenizer_corpus(0), vocab_size=vocab_size)
    return {"out": out, "vocab_size": len(tok)}
