"""Shard files: one safetensors file per shard with its records' columns concatenated, their offsets and keys.

Tensors of a shard holding R records::

    record.key        (R, 32) uint8    the record keys (sha256 digests)
    record.count      (R,) int32       stored positions per record (n)
    record.flags      (R,) uint8       bit 0: the record has sequence log-probs
    record.seq        (R, 2) float64   sequence log-probs (chosen, rejected); 0 when absent
    record.crc32      (R,) uint32      crc32 of the record's bytes in all the other tensors (checked on every read)
    col.NAME          (N, ...)         column NAME of all records, concatenated along the first dimension
    col.NAME.offsets  (R + 1,) int64   record r owns rows [offsets[r], offsets[r + 1]) of col.NAME

The columns are ``positions`` (the stored positions as ``[start, stop)`` runs, int32 ``(runs, 2)``) and those of
the codec (``mmkd.cache.codec``). The safetensors metadata has one key, ``mmkd.cache``, whose value is a JSON
object: format, rank, seq, records, positions, codec, the sha256 of the header the shard was written under, and
the sha256 of the shard's content (every tensor's name, dtype, shape and bytes, in name order). One key only:
safetensors writes several metadata keys in a per-process random order, and shards must be byte-identical when
a killed run is resumed.

A shard exists under its final name (:mod:`mmkd.cache.folder`) only once complete: it is written to a hidden
temporary name, fsynced, renamed, and the folder fsynced.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from mmkd.cache.errors import CorruptShardError

__all__ = [
    "SHARD_FORMAT",
    "EncodedRecord",
    "ShardReader",
    "build_shard",
    "content_digest",
    "positions_from_runs",
    "record_crc",
    "runs_from_positions",
    "write_atomic",
]

SHARD_FORMAT = "mmkd-cache-shard/1"
META_KEY = "mmkd.cache"
FLAG_SEQUENCE = 1


def runs_from_positions(positions: np.ndarray) -> np.ndarray:
    """``[start, stop)`` runs ``(u, 2)`` int32 of strictly increasing positions ``(n,)`` (answers are one run)."""
    if positions.size == 0:
        return np.zeros((0, 2), dtype=np.int32)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.concatenate([[0], breaks])]
    stops = positions[np.concatenate([breaks - 1, [positions.size - 1]])] + 1
    return np.stack([starts, stops], axis=1).astype(np.int32)


def positions_from_runs(runs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`runs_from_positions`, ``(u, 2) -> (n,)`` int64."""
    if runs.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs.tolist()])


@dataclass(frozen=True)
class EncodedRecord:
    """One record as the shard stores it (columns already encoded)."""

    key: bytes
    count: int
    flags: int
    seq: np.ndarray
    columns: Mapping[str, np.ndarray]
    crc32: int

    @property
    def nbytes(self) -> int:
        return 32 + 4 + 1 + 16 + 4 + sum(a.nbytes + 8 for a in self.columns.values())


def record_crc(key: bytes, count: int, flags: int, seq: np.ndarray, columns: Mapping[str, np.ndarray]) -> int:
    """crc32 of a record's bytes in every tensor, columns in name order (what the reader recomputes)."""
    crc = zlib.crc32(key)
    crc = zlib.crc32(np.int32(count).tobytes(), crc)
    crc = zlib.crc32(np.uint8(flags).tobytes(), crc)
    crc = zlib.crc32(np.ascontiguousarray(seq, dtype="<f8").tobytes(), crc)
    for name in sorted(columns):
        crc = zlib.crc32(np.ascontiguousarray(columns[name]).tobytes(), crc)
    return crc


def build_shard(
    records: Sequence[EncodedRecord], columns: Mapping[str, tuple[np.dtype, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """The tensors of a shard from its records; ``columns`` gives each column's dtype and trailing shape."""
    tensors: dict[str, np.ndarray] = {
        "record.key": np.frombuffer(b"".join(r.key for r in records), dtype=np.uint8).reshape(len(records), 32),
        "record.count": np.array([r.count for r in records], dtype=np.int32),
        "record.flags": np.array([r.flags for r in records], dtype=np.uint8),
        "record.seq": np.array([r.seq for r in records], dtype=np.float64).reshape(len(records), 2),
        "record.crc32": np.array([r.crc32 for r in records], dtype=np.uint32),
    }
    for name, (dtype, trailing) in columns.items():
        parts = [np.asarray(r.columns[name], dtype=dtype).reshape(-1, *trailing) for r in records]
        tensors[f"col.{name}"] = np.concatenate(parts) if parts else np.zeros((0, *trailing), dtype=dtype)
        tensors[f"col.{name}.offsets"] = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
    return tensors


def content_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of the file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def serialize_shard(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """The shard file's bytes: safetensors with the one-key JSON metadata (sorted, so deterministic)."""
    meta = {**meta, "content_sha256": content_digest(tensors)}
    return save(dict(tensors), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def fsync_dir(folder: Path) -> None:
    """fsync a folder, which makes the renames inside it durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: Path, data: bytes, temp: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent (or its old self) or complete.

    Temporary file in the same folder, fsync, rename over the target, fsync of the folder. On an error the
    temporary file is removed and the error raised.
    """
    temp = temp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class ShardReader:
    """Reads records from one shard file through safetensors' memory map, a few slices per record.

    Opening reads the header and the small per-record tensors (keys, counts, offsets); a record's column
    slices are read on demand and checked against its crc32.

    Args:
        path: The shard file.
        header_sha256: The digest of the cache header; a shard written under another header is refused.
        columns: The column names the codec reads (plus ``positions``).
    """

    def __init__(self, path: Path, header_sha256: str | None, columns: Sequence[str]) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            meta_text = (self._file.metadata() or {}).get(META_KEY)
        except Exception as e:  # safetensors raises its own error types (truncated file, bad header)
            raise CorruptShardError(f"{self.path}: not a complete cache shard ({_one_line(e)})") from None
        try:
            self.meta = json.loads(meta_text) if meta_text else {}
        except ValueError:
            self.meta = {}
        if self.meta.get("format") != SHARD_FORMAT:
            raise CorruptShardError(f"{self.path}: no {SHARD_FORMAT} metadata (not a cache shard of this version)")
        if header_sha256 is not None and self.meta.get("header_sha256") != header_sha256:
            raise CorruptShardError(
                f"{self.path}: written under another header.json (header sha256 {self.meta.get('header_sha256')}, "
                f"expected {header_sha256}): remove it or write the cache into a fresh folder"
            )
        names = set(self._file.keys())
        wanted = ["record.key", "record.count", "record.flags", "record.seq", "record.crc32"]
        wanted += [f"col.{c}{suffix}" for c in columns for suffix in ("", ".offsets")]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise CorruptShardError(f"{self.path}: missing tensors {', '.join(missing)}")
        self.columns = list(columns)
        self.keys = self._file.get_tensor("record.key")
        self.count = self._file.get_tensor("record.count")
        self.flags = self._file.get_tensor("record.flags")
        self.crc32 = self._file.get_tensor("record.crc32")
        self._seq = self._file.get_slice("record.seq")
        self.offsets = {c: self._file.get_tensor(f"col.{c}.offsets") for c in columns}
        self._slices = {c: self._file.get_slice(f"col.{c}") for c in columns}
        records = self.keys.shape[0]
        if self.meta.get("records") != records or any(o.shape != (records + 1,) for o in self.offsets.values()):
            raise CorruptShardError(f"{self.path}: record counts disagree between its metadata and its tensors")

    def __len__(self) -> int:
        return self.keys.shape[0]

    def read(self, row: int) -> tuple[int, int, np.ndarray, dict[str, np.ndarray]]:
        """Record ``row``'s count, flags, sequence log-probs ``(2,)`` and columns, checked against its crc32."""
        count, flags = int(self.count[row]), int(self.flags[row])
        seq = self._seq[row : row + 1].reshape(2)
        columns = {}
        for c in self.columns:
            start, stop = int(self.offsets[c][row]), int(self.offsets[c][row + 1])
            if not 0 <= start <= stop <= self._slices[c].get_shape()[0]:
                raise CorruptShardError(f"{self.path}: record {row} has column {c} rows outside the shard")
            columns[c] = self._slices[c][start:stop] if stop > start else self._empty(c)
        if record_crc(self.keys[row].tobytes(), count, flags, seq, columns) != int(self.crc32[row]):
            raise CorruptShardError(
                f"{self.path}: record {row} ({self.keys[row].tobytes().hex()}) fails its checksum: the shard is "
                "corrupted (run verify, then remove the shard and rewrite it)"
            )
        return count, flags, seq, columns

    def _empty(self, column: str) -> np.ndarray:
        """A zero-row array of a column's dtype and row shape (safetensors refuses an empty slice of an empty
        tensor, as a shard of records without top-k has)."""
        rows = self._slices[column].get_shape()[0]
        whole = self._slices[column][0:1] if rows else self._file.get_tensor(f"col.{column}")
        return whole[:0]

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the shard, read whole (for :func:`content_digest`)."""
        return {name: self._file.get_tensor(name) for name in self._file.keys()}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
