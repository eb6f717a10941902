"""Image-caption batches for CLIP distillation: each side tokenised and preprocessed by its own model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from mmkd.contract import CLIPBatch

__all__ = ["CLIPCollator", "caption_of"]


def caption_of(record: dict[str, Any]) -> str:
    """The caption of a caption-pair record: its last assistant turn (LLaVA pretraining layout)."""
    for message in reversed(record.get("messages", [])):
        if message["role"] == "assistant":
            return message["content"]
    raise ValueError(f"record {record.get('id')!r}: expected an assistant turn holding the caption")


class CLIPCollator:
    """Caption-pair records (one image each) -> :class:`~mmkd.contract.CLIPBatch`, each model's own inputs.

    Args:
        student: A CLIP model with ``preprocess_images(list[Image]) -> (B,3,H,W)`` and ``tokenize(list[str])``.
        teacher: The same for the teacher, or None.
    """

    def __init__(self, student: Any, teacher: Any | None = None):
        self.student, self.teacher = student, teacher
        self.stats = {"samples": 0, "bad": 0}

    @classmethod
    def for_models(cls, student: Any, teacher: Any | None = None, **_: Any) -> CLIPCollator:
        return cls(student, teacher)

    def __call__(self, records: Sequence[dict[str, Any] | None]) -> CLIPBatch:
        kept = [r for r in records if r is not None and r.get("images")]
        stats = {"samples": len(kept), "bad": len(records) - len(kept)}
        images = [r["images"][0] for r in kept]
        texts = [caption_of(r) for r in kept]
        standin = not kept
        if standin:
            # Every record was unreadable: a blank stand-in pair that the training step weighs by 0, so this
            # rank still runs its step (see mmkd.data.collate.STANDIN_RECORD).
            images, texts = [Image.new("RGB", (8, 8))], ["."]
        batch = CLIPBatch(self.student.preprocess_images(images), self.student.tokenize(texts), standin=standin,
                          data_stats=stats)
        if self.teacher is not None:
            batch.teacher_images = self.teacher.preprocess_images(images)
            batch.teacher_text = self.teacher.tokenize(texts)
        return batch
