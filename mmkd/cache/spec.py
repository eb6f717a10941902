"""The cache header: which teacher wrote the cache, with what tokenizer, k, vocabulary and codec (``header.json``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mmkd.cache.codec import PackedCodec, TopKCodec, build_codec
from mmkd.cache.keys import KEY_VERSION

__all__ = ["FORMAT", "CacheSpec"]

FORMAT = "mmkd-cache/1"


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds and which teacher wrote it; the writer records it, every reader checks it.

    Fingerprints are opaque to the cache: the caller computes them (e.g. a sha256 of the tokenizer files) and the
    reader compares them with what it expects.

    Args:
        teacher: The teacher's path or hub id.
        vocab_size: V, the size of the teacher's output distribution.
        k: Top-k entries stored per position.
        revision: The teacher's revision (commit hash for a hub model), None for a local folder.
        dtype: The dtype the teacher ran in (``"bfloat16"``).
        tokenizer: Tokenizer fingerprint (a string or a JSON-able mapping).
        processor: Image processor fingerprint, None for a text-only teacher.
        temperature: The temperature the log-probs were computed at (TopKKL's tail bucket needs 1).
        stored: What each record stores, e.g. ``("answer",)``, ``("answer", "visual")``,
            ``("answer", "sequence_logprobs")``; compared, not interpreted.
        codec: How the top-k is stored; None for ``PackedCodec()``.
        extra: Anything else the caller wants checked (JSON-able).
    """

    teacher: str
    vocab_size: int
    k: int
    revision: str | None = None
    dtype: str | None = None
    tokenizer: str | Mapping[str, Any] | None = None
    processor: str | Mapping[str, Any] | None = None
    temperature: float = 1.0
    stored: tuple[str, ...] = ("answer",)
    codec: TopKCodec | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or not 1 < self.vocab_size < 2**31:
            raise ValueError(f"vocab_size={self.vocab_size!r}: expected an integer in [2, 2**31)")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k={self.k!r}: expected an integer in [1, vocab_size={self.vocab_size}]")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: expected a positive number")
        # Mappings and sequences are normalized through JSON so that a spec read back from header.json compares
        # equal to the one the caller built (tuples vs lists, int vs float keys, ...).
        for name in ("tokenizer", "processor", "extra"):
            object.__setattr__(self, name, _jsonable(getattr(self, name), name))
        object.__setattr__(self, "stored", tuple(str(s) for s in self.stored))
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.codec is None:
            object.__setattr__(self, "codec", PackedCodec())

    def to_json(self) -> dict[str, Any]:
        """The header as written to ``header.json`` (with the format and key versions)."""
        out: dict[str, Any] = {"format": FORMAT, "key_version": KEY_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.params() if f.name == "codec" else list(value) if f.name == "stored" else value
        return out

    def to_bytes(self) -> bytes:
        """Canonical bytes of the header (sorted keys): equal specs give equal bytes, hence equal digests."""
        return (json.dumps(self.to_json(), sort_keys=True, indent=1) + "\n").encode()

    def digest(self) -> str:
        """sha256 hex of :meth:`to_bytes`; each shard records the digest of the header it was written under."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "header") -> CacheSpec:
        """Parse a header; ``where`` (the file) names the source in errors."""
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != FORMAT:
            raise ValueError(f"{where}: format {fmt!r}, expected {FORMAT!r} (not a teacher cache of this version)")
        key_version = data.pop("key_version", None)
        if key_version != KEY_VERSION:
            raise ValueError(f"{where}: record keys of version {key_version!r}, expected {KEY_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown header fields {', '.join(unknown)}")
        try:
            codec = build_codec(data.pop("codec"))
            stored = tuple(data.pop("stored", ("answer",)))
            return cls(**data, stored=stored, codec=codec)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def differences(self, expected: CacheSpec, include_codec: bool = False) -> list[str]:
        """What differs from ``expected``, one short phrase per field (``"k is 64, expected 32"``).

        The codec is left out by default: a reader decodes any codec, so only the writer (which must not mix two
        codecs in one folder) compares it.
        """
        mine, theirs = self.to_json(), expected.to_json()
        if not include_codec:
            mine.pop("codec")
            theirs.pop("codec")
        out: list[str] = []
        _diff(mine, theirs, "", out)
        return out


def _jsonable(value: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a JSON-able value ({e})") from None


def _diff(mine: Any, theirs: Any, path: str, out: list[str]) -> None:
    """Leaf-level differences of two JSON values, nested keys joined with dots (``teacher.revision``)."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs)):
            sub = f"{path}.{key}" if path else key
            if key not in mine:
                out.append(f"{sub} is missing, expected {_short(theirs[key])}")
            elif key not in theirs:
                out.append(f"{sub} is {_short(mine[key])}, expected none")
            else:
                _diff(mine[key], theirs[key], sub, out)
    elif mine != theirs:
        out.append(f"{path} is {_short(mine)}, expected {_short(theirs)}")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
