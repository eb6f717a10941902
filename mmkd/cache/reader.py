"""Reading a teacher cache by record key, from any process (DataLoader workers included)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from mmkd.cache.errors import (
    CacheError,
    CacheMismatchError,
    CorruptShardError,
    IndexConsistencyError,
    MissingRecordError,
)
from mmkd.cache.folder import HEADER, INDEX, INDEX_FORMAT, key_bytes, list_shards, read_header
from mmkd.cache.shard import FLAG_SEQUENCE, META_KEY, ShardReader, positions_from_runs
from mmkd.cache.spec import CacheSpec

__all__ = ["CacheReader", "CacheRecord", "CacheIndex", "ShardInfo", "scan_index"]


@dataclass(frozen=True)
class CacheRecord:
    """One record's teacher targets, as ``mmkd.losses.TopKKL`` takes them.

    Attributes:
        key: The record key.
        positions: ``(n,)`` long, the teacher's logits rows stored (as the writer was given them).
        ids: ``(n, K)`` long, top-k token ids by decreasing log-prob (as written, for the raw codec).
        logprobs: ``(n, K)`` float32; ``1 - logprobs.exp().sum(-1)`` is the stored tail mass.
        log_tail: ``(n,)`` float32, log of the teacher's mass outside the top-k.
        sequence_logprobs: ``(2,)`` float64 (chosen, rejected) sequence log-probs, or None.
    """

    key: str
    positions: Tensor
    ids: Tensor
    logprobs: Tensor
    log_tail: Tensor
    sequence_logprobs: Tensor | None


@dataclass(frozen=True)
class ShardInfo:
    """A complete shard as the index knows it: file name, size in bytes, content digest, record count."""

    name: str
    size: int
    content_sha256: str
    records: int


@dataclass(frozen=True)
class CacheIndex:
    """Every record of a cache: keys sorted (``(R,)`` bytes of 32), their shard (index into ``shards``) and row.

    numpy arrays rather than a dict of Python objects: a DataLoader worker forked from the main process shares
    them page for page (touching a Python object's refcount copies its page; a dict of a million keys would be
    copied into every worker).
    """

    shards: tuple[ShardInfo, ...]
    keys: np.ndarray
    shard: np.ndarray
    row: np.ndarray


def record_columns(spec: CacheSpec) -> list[str]:
    return ["positions", *spec.codec.columns(spec.k)]


def scan_index(folder: Path, spec: CacheSpec) -> CacheIndex:
    """Build the index from the shards' own key tensors (what the reader does without a merged index).

    Raises:
        CorruptShardError: A shard cannot be read or was written under another header.
        IndexConsistencyError: A rank's shards have a gap, or two shards hold the same key.
    """
    header = spec.digest()
    shards, keys, where = [], [], []
    next_seq: dict[int, int] = {}
    for rank, seq, path in list_shards(folder):
        expected = next_seq.get(rank, 0)
        if seq != expected:
            raise IndexConsistencyError(f"{path}: rank {rank} has no shard {expected} before shard {seq}")
        next_seq[rank] = seq + 1
        reader = ShardReader(path, header, record_columns(spec))
        shards.append(ShardInfo(path.name, path.stat().st_size, reader.meta["content_sha256"], len(reader)))
        keys.append(reader.keys)
        where.append(np.stack([np.full(len(reader), len(shards) - 1), np.arange(len(reader))], axis=1))
    if not shards:
        empty = np.zeros(0, dtype=np.int64)
        return CacheIndex((), np.zeros(0, dtype="S32"), empty.astype(np.int32), empty)
    flat = np.ascontiguousarray(np.concatenate(keys)).view("S32").reshape(-1)
    loc = np.concatenate(where)
    order = np.argsort(flat, kind="stable")
    flat, loc = flat[order], loc[order]
    _check_unique(flat, loc, shards, folder)
    return CacheIndex(tuple(shards), flat, loc[:, 0].astype(np.int32), loc[:, 1].astype(np.int64))


def _check_unique(keys: np.ndarray, loc: np.ndarray, shards: list[ShardInfo], folder: Path) -> None:
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if dup.size:
        i = int(dup[0])
        a, b = shards[int(loc[i, 0])].name, shards[int(loc[i + 1, 0])].name
        raise IndexConsistencyError(
            f"{folder}: record {_hex(keys[i])} is in two shards ({a} and {b}); each record must be written by one "
            "rank only"
        )


def _hex(key: bytes) -> str:
    """Hex of a key taken from an 'S32' array (numpy drops trailing zero bytes of such elements)."""
    return key.ljust(32, b"\0").hex()


def load_merged_index(folder: Path, spec: CacheSpec) -> CacheIndex | None:
    """The merged index when it exists and still describes the shards on disk (names and sizes), else None."""
    path = folder / INDEX
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            if meta.get("format") != INDEX_FORMAT or meta.get("header_sha256") != spec.digest():
                return None
            on_disk = [(p.name, p.stat().st_size) for _, _, p in list_shards(folder)]
            if on_disk != [(s[0], s[1]) for s in meta["shards"]]:
                return None
            keys = np.ascontiguousarray(f.get_tensor("key")).view("S32").reshape(-1)
            shard, row = f.get_tensor("shard"), f.get_tensor("row")
    except Exception as e:  # safetensors' own error types; removing the file makes the reader scan the shards
        raise CorruptShardError(f"{path}: unreadable merged index ({' '.join(str(e).split())}); remove it") from None
    shards = tuple(ShardInfo(*s) for s in meta["shards"])
    if keys.shape != shard.shape or keys.shape != row.shape or keys.shape[0] != meta["records"]:
        raise CorruptShardError(f"{path}: its key, shard and row tensors disagree; remove it")
    return CacheIndex(shards, keys, shard, row)


class CacheReader:
    """Random access to a cache's records by key.

    Opening reads ``header.json``, checks it against ``expect`` and builds the key index (from the merged index of
    :func:`mmkd.cache.finalize` when it matches the shards, else from every shard's key tensor). Shard files are
    opened lazily, once per process: the reader pickles without its open files, so it can be handed to
    DataLoader workers (fork or spawn). Every record read is checked against its crc32.

    Args:
        folder: The cache folder.
        expect: The spec the caller needs (teacher, tokenizer, k, V, temperature, stored, extra); None skips the
            check (see :meth:`check`).
    """

    def __init__(self, folder: str | Path, expect: CacheSpec | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CacheError(f"{self.folder}: no such teacher cache folder")
        spec = read_header(self.folder)
        if spec is None:
            raise CacheError(f"{self.folder}: no {HEADER} (not a teacher cache, or its writer never started)")
        self.spec = spec
        if expect is not None:
            self.check(expect)
        self.index = load_merged_index(self.folder, spec) or scan_index(self.folder, spec)
        self._columns = record_columns(spec)
        self._header_sha256 = spec.digest()
        self._open: dict[int, ShardReader] = {}
        self._pid = os.getpid()

    def check(self, expect: CacheSpec) -> None:
        """Raise :class:`CacheMismatchError` (one line, every difference) unless the header matches ``expect``."""
        diffs = self.spec.differences(expect)
        if diffs:
            raise CacheMismatchError(f"{self.folder / HEADER}: stale teacher cache: {'; '.join(diffs)}")

    def __len__(self) -> int:
        return int(self.index.keys.shape[0])

    def __contains__(self, key: str) -> bool:
        return self._find(key_bytes(key)) is not None

    def keys(self) -> list[str]:
        """Every record key (hex), sorted."""
        return [_hex(k) for k in self.index.keys.tolist()]

    def _find(self, raw: bytes) -> int | None:
        keys = self.index.keys
        i = int(np.searchsorted(keys, np.bytes_(raw)))
        # 'S32' drops trailing zero bytes when comparing; compare the padded bytes to be exact.
        return i if i < keys.shape[0] and keys[i].ljust(32, b"\0") == raw else None

    def _shard(self, i: int) -> ShardReader:
        if os.getpid() != self._pid:  # forked into a worker: the parent's handles are not ours
            self._open, self._pid = {}, os.getpid()
        shard = self._open.get(i)
        if shard is None:
            info = self.index.shards[i]
            path = self.folder / info.name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptShardError(f"{path}: shard listed in the index is missing") from None
            if size != info.size:
                raise CorruptShardError(f"{path}: {size} bytes, the index recorded {info.size} (truncated or replaced)")
            shard = ShardReader(path, self._header_sha256, self._columns)
            if shard.meta.get("content_sha256") != info.content_sha256:
                raise CorruptShardError(f"{path}: content digest differs from the index's (the shard was replaced)")
            self._open[i] = shard
        return shard

    def check_shards(self) -> None:
        """Open every shard once (size against the index, header digest, content digest) and close it again, so a
        truncated or replaced shard is found now rather than at the first record read from it.

        Raises:
            CorruptShardError: Names the first bad shard.
        """
        for i in range(len(self.index.shards)):
            self._shard(i)
        self._open = {}

    def get(self, key: str) -> CacheRecord:
        """The record's tensors.

        Raises:
            MissingRecordError: No record has this key.
            CorruptShardError: Its shard is truncated, replaced or fails the record's checksum (names the file).
        """
        i = self._find(key_bytes(key))
        if i is None:
            raise MissingRecordError(key, str(self.folder))
        shard = self._shard(int(self.index.shard[i]))
        row = int(self.index.row[i])
        count, flags, seq, columns = shard.read(row)
        try:
            ids, logprobs, log_tail = self.spec.codec.decode(columns, count, self.spec.k)
            positions = positions_from_runs(columns["positions"])
        except ValueError as e:
            raise CorruptShardError(f"{shard.path}: record {row} ({key}) does not decode ({e})") from None
        if positions.shape[0] != count:
            raise CorruptShardError(
                f"{shard.path}: record {row} ({key}) has {positions.shape[0]} positions, not {count}"
            )
        return CacheRecord(
            key=key,
            positions=torch.from_numpy(positions),
            ids=torch.from_numpy(ids),
            logprobs=torch.from_numpy(logprobs),
            log_tail=torch.from_numpy(log_tail),
            sequence_logprobs=torch.from_numpy(seq.copy()) if flags & FLAG_SEQUENCE else None,
        )

    def __getitem__(self, key: str) -> CacheRecord:
        """``reader[key]`` is :meth:`get`: the reader is a map-style dataset over record keys."""
        return self.get(key)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
