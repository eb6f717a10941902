"""Vocabulary alignment between a teacher and a student that share a tokenizer."""

from __future__ import annotations

from typing import Any


def _vocab_rows(model: Any) -> int:
    return int(model.hf.get_output_embeddings().weight.shape[0])


def align_vocab(teacher: Any, student: Any) -> int:
    """Make teacher and student produce logits over the same vocabulary: the tokenizer's ``len``.

    Checkpoints often pad their embedding matrices to a multiple of 64 or 128 (Qwen2: 151,936 rows in one size,
    152,064 in another) for the same tokenizer; the padding rows are never real tokens. Both models then expose
    only the first ``len(tokenizer)`` rows of their LM head (``ModelOutput.head_weight``), so logits line up.

    Args:
        teacher: An :class:`~mmkd.models.ImageTextModel` (e.g. ``LlavaModel``), or the input side of one
            (:class:`~mmkd.models.ImageTextInputs`, a teacher read from a cache).
        student: An :class:`~mmkd.models.ImageTextModel` (e.g. ``MLLMStudent``).

    Returns:
        The common vocabulary size ``V``.

    Raises:
        ValueError: The tokenizers differ (cross-tokenizer distillation is not supported), or a head has
            fewer rows than the tokenizer has tokens.
    """
    t_tok, s_tok = teacher.tokenizer, student.tokenizer
    if t_tok.get_vocab() != s_tok.get_vocab():
        raise ValueError(
            f"teacher tokenizer {t_tok.name_or_path!r} ({len(t_tok)} tokens) and student tokenizer "
            f"{s_tok.name_or_path!r} ({len(s_tok)} tokens) differ; cross-tokenizer distillation is not supported, "
            "give both the same tokenizer"
        )
    size = len(s_tok)
    for role, model in (("teacher", teacher), ("student", student)):
        if getattr(model, "hf", None) is None:
            continue  # the input side of a teacher read from a cache: the cache holds V = len(tokenizer) already
        rows = _vocab_rows(model)
        if rows < size:
            raise ValueError(
                f"{role} LM head has {rows} rows but the tokenizer has {size} tokens; resize its embeddings"
            )
        model.vocab_limit = size
    return size
