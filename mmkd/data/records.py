"""What every reader shares: JSON loading, image loading, the bad-record policy and the record base class.

A record is a plain dict (docs/architecture.md): ``{"id", "images": list[PIL.Image] (RGB), "messages": [...]}``
plus reader-specific keys. Readers validate structure and image paths when constructed, so a malformed file
fails before training starts; an unreadable image can only be found when it is opened in ``__getitem__``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Record = dict[str, Any]


def load_json(path: str | os.PathLike[str]) -> Any:
    """Read a ``.json`` file, or a ``.jsonl`` file as a list of its lines; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_image(path: str | os.PathLike[str], where: str) -> Image.Image:
    """Open an image fully (so that a truncated file fails here, not later in a worker) and convert it to RGB.

    Args:
        path: Image file.
        where: ``"<file>: record '<id>'"``, prefixed to the error message.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image {path} not found") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for corrupt/truncated files
        raise ValueError(f"{where}: cannot read image {path} ({type(e).__name__}: {e})") from None


class BadRecord(ValueError):
    """A record that does not match its format; the message names the file and record."""


class RecordDataset(Dataset):
    """Map-style dataset over pre-validated entries; images are opened lazily in ``__getitem__``.

    With ``skip_bad=False`` every bad record raises a one-line error naming the file and record. With
    ``skip_bad=True`` records found bad at construction are left out and listed in ``skipped``; a record whose
    image turns out unreadable in ``__getitem__`` yields ``None``, which the collators drop and count in
    ``batch["data_stats"]["bad"]``, so nothing disappears silently.

    Attributes:
        skipped: One message per record left out at construction.
    """

    def __init__(self, source: str | os.PathLike[str], skip_bad: bool) -> None:
        self.source = str(source)
        self.skip_bad = skip_bad
        self.skipped: list[str] = []
        self._entries: list[dict[str, Any]] = []

    def _reject(self, error: Exception) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append(str(error))

    def _check_images(self, where: str, paths: list[str]) -> bool:
        for p in paths:
            if not os.path.isfile(p):
                self._reject(FileNotFoundError(f"{where}: image {p} not found"))
                return False
        return True

    def _load(self, raws: Any, parse: Any, check_images: bool = True) -> None:
        """Parse every raw record (``parse(raw, index) -> entry``), reject or skip bad ones, then ``_finish``."""
        for index, raw in enumerate(raws):
            try:
                entry = parse(raw, index)
            except BadRecord as e:
                self._reject(e)
                continue
            if check_images and not self._check_images(entry["where"], entry["image_paths"]):
                continue
            self._entries.append(entry)
        self._finish()

    def _finish(self) -> None:
        if not self._entries:
            reason = f" ({len(self.skipped)} bad records skipped, first: {self.skipped[0]})" if self.skipped else ""
            raise ValueError(f"{self.source}: no usable records{reason}; expected at least one")

    def __len__(self) -> int:
        return len(self._entries)

    def summary(self) -> dict[str, int]:
        """Counts for a stage summary: records kept and records skipped at construction."""
        return {"records": len(self._entries), "skipped_bad": len(self.skipped)}

    def _make(self, entry: dict[str, Any]) -> Record:
        """Build the record of one entry (subclasses add keys); images are loaded by ``__getitem__``."""
        return {"id": entry["id"], "messages": [dict(m) for m in entry["messages"]]}

    def __getitem__(self, index: int) -> Record | None:
        entry = self._entries[index]
        try:
            images = [load_image(p, entry["where"]) for p in entry["image_paths"]]
        except (OSError, ValueError):
            if self.skip_bad:
                return None
            raise
        record = self._make(entry)
        record["images"] = images
        return record


def parse_conversation(turns: Any, where: str, n_images: int, *, need_answer: bool = True) -> list[dict[str, str]]:
    """Validate LLaVA ``conversations`` and map them to chat messages.

    Args:
        turns: The record's ``conversations`` value: ``[{"from": "human"|"gpt"|..., "value": str}, ...]``.
        where: ``"<file>: record '<id>'"`` for error messages.
        n_images: Number of images of the record; user turns must carry exactly this many ``<image>``.
        need_answer: Require at least one assistant turn.

    Returns:
        ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``.
    """
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadRecord(
                f"{where}: conversations[{k}] must be {{'from': one of {sorted(ROLES)}, 'value': str}}, got {turn!r}"[
                    :300
                ]
            )
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: 'conversations' has no assistant ('gpt') turn to learn from")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] != "assistant")
    if placeholders != n_images:
        raise BadRecord(f"{where}: {placeholders} '<image>' placeholders in the prompt turns but {n_images} images")
    return messages


def image_list(value: Any, where: str) -> list[str]:
    """A record's ``image`` field as a list of relative paths (absent/None means no image)."""
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise BadRecord(f"{where}: 'image' must be a path or a list of paths, got {value!r}"[:300])
