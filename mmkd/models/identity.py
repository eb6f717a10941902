"""Which model this is, without loading its weights: fingerprints of its tokenizer, processor and weight files.

A teacher cache records the identity of the teacher that wrote it, and a stage that reads the cache compares it with
the recipe's teacher before training. Everything here reads configuration files and a few bytes of each weight file;
nothing loads the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["WEIGHT_SUFFIXES", "processor_fingerprint", "source_identity", "tokenizer_fingerprint",
           "weights_fingerprint"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Bytes read from each end of a weight file: a safetensors header (names, shapes, offsets) sits at the start, and the
# last tensors at the end change with any training step; reading the whole file would take minutes for a 7B model.
_SAMPLE_BYTES = 1 << 20


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: its vocabulary, added tokens, special tokens and chat template."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return _digest({
        "class": type(tokenizer).__name__.removesuffix("Fast"),
        "vocab": sorted(tokenizer.get_vocab().items()),
        "added": sorted((int(i), str(t)) for i, t in added.items()),
        "special": dict(getattr(tokenizer, "special_tokens_map", {}) or {}),
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def processor_fingerprint(processor: Any) -> str | None:
    """sha256 of a processor's settings (image processor, visual-token counts), its tokenizer left out; None for a
    text-only tokenizer."""
    if not hasattr(processor, "image_processor"):
        return None
    settings = dict(processor.to_dict())
    for key in ("chat_template", "tokenizer", "processor_class"):
        settings.pop(key, None)
    return _digest(settings)


def weights_fingerprint(folder: str | Path) -> str | None:
    """sha256 over each weight file of a local model folder: its name, size, first and last MiB. None when the folder
    holds no weight file (a hub id: its revision identifies it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            h.update(f.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                f.seek(size - _SAMPLE_BYTES)
                h.update(f.read(_SAMPLE_BYTES))
            elif size > _SAMPLE_BYTES:
                h.update(f.read())
    return h.hexdigest() if files else None


def source_identity(path: str, *, revision: str | None = None, dtype: str = "float32",
                    quantize: str | None = None) -> dict[str, Any]:
    """A loaded (or loadable) model's identity: its path or hub id as given, revision, dtype, quantization and the
    fingerprint of its local weight files."""
    return {"teacher": str(path), "revision": revision, "dtype": str(dtype), "quantize": quantize,
            "weights": weights_fingerprint(path)}
