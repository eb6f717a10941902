"""Writing a teacher cache: one ``CacheWriter`` per rank appends records; rank 0 may ``finalize`` a merged index.

The folder's layout is in :mod:`mmkd.cache.folder`, a shard's tensors in :mod:`mmkd.cache.shard`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save

from mmkd.cache.codec import check_topk
from mmkd.cache.errors import CacheError, CacheMismatchError, IndexConsistencyError, RecordError
from mmkd.cache.folder import (
    HEADER,
    INDEX,
    INDEX_FORMAT,
    key_bytes,
    list_shards,
    read_header,
    shard_name,
    temp_name,
    temp_shards,
)
from mmkd.cache.reader import scan_index
from mmkd.cache.shard import (
    FLAG_SEQUENCE,
    META_KEY,
    SHARD_FORMAT,
    EncodedRecord,
    ShardReader,
    build_shard,
    record_crc,
    runs_from_positions,
    serialize_shard,
    write_atomic,
)
from mmkd.cache.spec import CacheSpec

__all__ = ["CacheWriter", "finalize"]


class CacheWriter:
    """Appends records to this rank's shards of a cache folder; resumable after a kill at any moment.

    Records are buffered in memory and written a shard at a time (``shard_records`` records or ``shard_bytes``
    bytes, whichever comes first), each shard under a temporary name, fsynced and renamed: a shard visible under
    its final name is complete, and its records (its own index: keys and offsets are inside it) become visible
    with it. Reopening the writer on the same folder and rank picks up after the last complete shard: records
    already in a complete shard are skipped by :meth:`add` (check ``key in writer`` before running the teacher),
    so replaying the same sequence of records produces shards byte-identical to an uninterrupted run.

    Ranks write disjoint records concurrently into one folder (shard names carry the rank; the header is
    identical for all). Leaving the ``with`` block normally writes the last, partial shard; leaving it with an
    exception drops the buffered records (they are rewritten on resume), so shard boundaries stay those of an
    uninterrupted run.

    Everything a caller can get wrong is checked before anything is written: an unwritable folder, a header
    that differs from ``spec`` (another teacher, tokenizer, k, codec, ...), a shard of this rank written under
    another header.

    Args:
        folder: The cache folder (created if missing).
        spec: What the cache holds; must equal the header of an existing cache.
        rank: This process's rank (shard names carry it).
        shard_records: Records per shard at most.
        shard_bytes: Approximate bytes per shard at most (a record larger than this gets a shard of its own).
    """

    def __init__(
        self,
        folder: str | Path,
        spec: CacheSpec,
        *,
        rank: int = 0,
        shard_records: int = 4096,
        shard_bytes: int = 256 << 20,
    ) -> None:
        if not 0 <= rank < 100_000:
            raise ValueError(f"rank={rank}: expected 0 <= rank < 100000")
        if shard_records < 1 or shard_bytes < 1:
            raise ValueError(f"shard_records={shard_records}, shard_bytes={shard_bytes}: expected positive sizes")
        self.folder = Path(folder)
        self.spec = spec
        self.rank = rank
        self.shard_records = shard_records
        self.shard_bytes = shard_bytes
        self._codec = spec.codec
        self._columns = {"positions": (np.dtype(np.int32), (2,)), **self._codec.columns(spec.k)}
        self._header_sha256 = spec.digest()
        # Read-only checks first (header, this rank's shards), then the writability probe, then the first writes.
        existing = self._check_header()
        self._committed: set[bytes] = set()
        self._seq = self._scan_own_shards()
        self._prepare_folder(write_header=existing is None)
        self._buffer: list[EncodedRecord] = []
        self._buffer_keys: set[bytes] = set()
        self._buffer_bytes = 0
        self._closed = False
        self.skipped = 0

    # ---------------------------------------------------------------- setup
    def _check_header(self) -> CacheSpec | None:
        existing = read_header(self.folder) if self.folder.is_dir() else None
        if existing is not None:
            diffs = existing.differences(self.spec, include_codec=True)
            if diffs:
                raise CacheMismatchError(
                    f"{self.folder / HEADER}: the cache was written for another setup ({'; '.join(diffs)}); "
                    "write into a fresh folder"
                )
        return existing

    def _scan_own_shards(self) -> int:
        """Load the keys of this rank's complete shards; returns the next shard number."""
        if not self.folder.is_dir():
            return 0
        mine = [(seq, path) for rank, seq, path in list_shards(self.folder) if rank == self.rank]
        for expected, (seq, path) in enumerate(mine):
            if seq != expected:
                raise IndexConsistencyError(
                    f"{path}: rank {self.rank} has no shard {expected} before shard {seq} (a shard was removed); "
                    "remove the later shards of this rank too, then resume"
                )
            shard = ShardReader(path, self._header_sha256, list(self._columns))
            self._committed.update(k.tobytes() for k in shard.keys)
        return len(mine)

    def _prepare_folder(self, write_header: bool) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe-r{self.rank:05d}-{os.getpid()}"
            write_atomic(probe, b"")
            probe.unlink()
        except OSError as e:
            raise CacheError(f"{self.folder}: cannot write the teacher cache here ({e.strerror or e})") from None
        if write_header:
            # Every rank may get here at once: each writes the same bytes under its own temporary name.
            write_atomic(self.folder / HEADER, self.spec.to_bytes(), self.folder / f".{HEADER}.tmp-r{self.rank:05d}")
        for path in temp_shards(self.folder, self.rank):
            path.unlink(missing_ok=True)  # the shard this rank was writing when it was killed

    # ---------------------------------------------------------------- writing
    @property
    def committed(self) -> int:
        """Records of this rank in complete shards (those a resumed run skips)."""
        return len(self._committed)

    def __contains__(self, key: str) -> bool:
        """Whether the record is already written or buffered (skip its teacher forward)."""
        raw = key_bytes(key)
        return raw in self._committed or raw in self._buffer_keys

    def add(
        self,
        key: str,
        positions: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        ids: np.ndarray | torch.Tensor | None = None,
        logprobs: np.ndarray | torch.Tensor | None = None,
        log_tail: np.ndarray | torch.Tensor | None = None,
        sequence_logprobs: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ) -> bool:
        """Append one record; returns False (and writes nothing) when its key is already in the cache.

        Args:
            key: :func:`mmkd.cache.record_key` of what the teacher saw.
            positions: ``(n,)`` strictly increasing indices of the teacher's logits rows whose top-k is stored (row
                ``t`` is the teacher's distribution of token ``t + 1`` of its input sequence); stored as given.
            ids: ``(n, K)`` top-k token ids (any order), or None for a record without top-k.
            logprobs: ``(n, K)`` the teacher's log-probabilities at those ids.
            log_tail: ``(n,)`` log of the probability outside the top-k (:func:`mmkd.cache.teacher_topk`); None
                computes it from ``logprobs`` (less precise when the tail is tiny).
            sequence_logprobs: ``(chosen, rejected)`` sequence log-probs of a preference record, or None.

        Raises:
            RecordError: The record's shapes or values are wrong (the message names the key).
        """
        if self._closed:
            raise CacheError(f"{self.folder}: the writer of rank {self.rank} is closed")
        raw = key_bytes(key)
        if raw in self._committed or raw in self._buffer_keys:
            self.skipped += 1
            return False
        record = self._encode(key, raw, positions, ids, logprobs, log_tail, sequence_logprobs)
        self._buffer.append(record)
        self._buffer_keys.add(raw)
        self._buffer_bytes += record.nbytes
        if len(self._buffer) >= self.shard_records or self._buffer_bytes >= self.shard_bytes:
            self._write_shard()
        return True

    def _encode(
        self,
        key: str,
        raw: bytes,
        positions: Any,
        ids: Any,
        logprobs: Any,
        log_tail: Any,
        sequence_logprobs: Any,
    ) -> EncodedRecord:
        k = self.spec.k
        pos = _array(positions if positions is not None else [])
        if pos.size and (pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer)):
            raise RecordError(f"record {key}: positions have shape {pos.shape} dtype {pos.dtype}; expected (n,) ints")
        pos = pos.astype(np.int64).reshape(-1)
        if pos.size and (pos[0] < 0 or (np.diff(pos) <= 0).any() or pos[-1] >= 2**31):
            raise RecordError(f"record {key}: positions must be strictly increasing and in [0, 2**31)")
        if ids is None and logprobs is None:
            if pos.size:
                raise RecordError(f"record {key}: {pos.size} positions but no top-k ids and log-probs")
            ids, logprobs, log_tail = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0)
        elif ids is None or logprobs is None:
            raise RecordError(f"record {key}: top-k ids and log-probs go together; got only one of them")
        try:
            ids, logprobs, log_tail = check_topk(ids, logprobs, log_tail, k, self.spec.vocab_size)
        except ValueError as e:
            raise RecordError(f"record {key}: {e}") from None
        if ids.shape[0] != pos.size:
            raise RecordError(f"record {key}: {ids.shape[0]} rows of top-k for {pos.size} positions")
        flags, seq = 0, np.zeros(2, dtype=np.float64)
        if sequence_logprobs is not None:
            seq = _array(sequence_logprobs).astype(np.float64).reshape(-1)
            if seq.shape != (2,) or not np.isfinite(seq).all():
                raise RecordError(f"record {key}: sequence log-probs must be two finite floats (chosen, rejected)")
            flags |= FLAG_SEQUENCE
        columns = {"positions": runs_from_positions(pos), **self._codec.encode(ids, logprobs, log_tail)}
        columns = {c: np.ascontiguousarray(columns[c], dtype=self._columns[c][0]) for c in self._columns}
        crc = record_crc(raw, pos.size, flags, seq, columns)
        return EncodedRecord(key=raw, count=pos.size, flags=flags, seq=seq, columns=columns, crc32=crc)

    def _write_shard(self) -> None:
        if not self._buffer:
            return
        tensors = build_shard(self._buffer, self._columns)
        meta = {
            "format": SHARD_FORMAT,
            "rank": self.rank,
            "seq": self._seq,
            "records": len(self._buffer),
            "positions": int(sum(r.count for r in self._buffer)),
            "codec": self._codec.name,
            "header_sha256": self._header_sha256,
        }
        name = shard_name(self.rank, self._seq)
        try:
            write_atomic(
                self.folder / name, serialize_shard(tensors, meta), self.folder / temp_name(self.rank, self._seq)
            )
        except OSError as e:
            raise CacheError(f"{self.folder / name}: cannot write the shard ({e.strerror or e})") from None
        self._committed.update(self._buffer_keys)
        self._seq += 1
        self._buffer, self._buffer_keys, self._buffer_bytes = [], set(), 0

    def close(self) -> None:
        """Write the last (partial) shard. The writer takes no more records afterwards."""
        if not self._closed:
            self._write_shard()
            self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._buffer, self._buffer_keys, self._closed = [], set(), True


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def finalize(folder: str | Path) -> Path:
    """Write the merged key index of every rank's shards (rank 0, once all ranks have closed their writers).

    The reader works without it (it then reads each shard's keys when it opens); with it, opening a cache of many
    shards reads one file. The index lists each shard's name, size and content digest: a reader ignores an index
    that no longer matches the shards on disk (a shard added by a resumed run, say).

    Returns:
        The index file.

    Raises:
        IndexConsistencyError: Two shards hold the same key, or a rank's shards have a gap.
    """
    folder = Path(folder)
    spec = read_header(folder)
    if spec is None:
        raise CacheError(f"{folder}: no {HEADER} (not a teacher cache)")
    index = scan_index(folder, spec)
    shards = [[s.name, s.size, s.content_sha256, s.records] for s in index.shards]
    meta = {"format": INDEX_FORMAT, "header_sha256": spec.digest(), "shards": shards, "records": len(index.keys)}
    tensors = {
        "key": np.frombuffer(index.keys.tobytes(), dtype=np.uint8).reshape(-1, 32),
        "shard": index.shard.astype(np.int32),
        "row": index.row.astype(np.int64),
    }
    path = folder / INDEX
    write_atomic(path, save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
    return path
