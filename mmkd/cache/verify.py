"""``verify``: re-check every shard's checksum and the index of a teacher cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.cache.errors import CacheError, CorruptShardError, IndexConsistencyError
from mmkd.cache.folder import HEADER, INDEX, list_shards, read_header, temp_shards
from mmkd.cache.reader import load_merged_index, record_columns, scan_index
from mmkd.cache.shard import ShardReader, content_digest, positions_from_runs

__all__ = ["VerifyReport", "verify"]


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` checked.

    Attributes:
        folder: The cache folder.
        shards: Complete shards.
        records: Records over all shards.
        positions: Stored positions (tokens) over all records.
        bytes: Bytes of the header, the shards and the merged index.
        records_per_rank: Records written by each rank.
        merged_index: ``"absent"``, ``"current"`` (checked entry by entry) or ``"stale"`` (describes other shards;
            readers ignore it: rerun finalize).
        temporary_files: Shards being written, or left by a killed writer (removed when that rank resumes).
    """

    folder: str
    shards: int
    records: int
    positions: int
    bytes: int
    records_per_rank: dict[int, int]
    merged_index: str
    temporary_files: int

    def summary(self) -> str:
        ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(self.records_per_rank.items())) or "no ranks"
        return (
            f"{self.folder}: OK, {self.records} records ({self.positions} positions) in {self.shards} shards "
            f"({ranks}), {self.bytes} bytes, merged index {self.merged_index}, {self.temporary_files} temporary files"
        )


def verify(folder: str | Path) -> VerifyReport:
    """Re-check a cache: every shard's content digest and per-record checksums, the offsets, the index.

    Checks, in order, stopping at the first problem: the header parses; each rank's shards are numbered without
    gaps; each shard opens, was written under this header, has the content digest its metadata records, has
    offsets that stay inside its columns, and every record's crc32 and position count hold; no key is in two
    shards; a current merged index has exactly the shards' entries.

    Returns:
        A report (``report.summary()`` is one line).

    Raises:
        CacheError: One line naming the file and what is wrong (a ``CorruptShardError`` for a damaged shard, an
            ``IndexConsistencyError`` for an index problem).
    """
    folder = Path(folder)
    spec = read_header(folder)
    if spec is None:
        raise CacheError(f"{folder}: no {HEADER} (not a teacher cache)")
    columns = record_columns(spec)
    header = spec.digest()
    total_bytes = (folder / HEADER).stat().st_size
    positions, per_rank = 0, {}
    shards = list_shards(folder)
    for rank, _, path in shards:
        reader = ShardReader(path, header, columns)
        tensors = reader.tensors()
        digest, recorded = content_digest(tensors), str(reader.meta.get("content_sha256"))
        if digest != recorded:
            raise CorruptShardError(
                f"{path}: content sha256 {digest[:16]}... differs from the recorded {recorded[:16]}...: "
                "the shard is corrupted"
            )
        for name, offsets in reader.offsets.items():
            rows = tensors[f"col.{name}"].shape[0]
            if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != rows:
                raise IndexConsistencyError(f"{path}: offsets of column {name} do not cover its {rows} rows in order")
        for row in range(len(reader)):
            count, _, _, cols = reader.read(row)
            if positions_from_runs(cols["positions"]).shape[0] != count:
                raise IndexConsistencyError(f"{path}: record {row} has a position count that its runs disagree with")
        if int(reader.count.sum()) != reader.meta.get("positions"):
            raise IndexConsistencyError(
                f"{path}: its metadata counts {reader.meta.get('positions')} positions, its records "
                f"{int(reader.count.sum())}"
            )
        positions += int(reader.count.sum())
        per_rank[rank] = per_rank.get(rank, 0) + len(reader)
        total_bytes += path.stat().st_size
    index = scan_index(folder, spec)  # rank gaps and duplicate keys
    merged = "absent"
    if (folder / INDEX).exists():
        total_bytes += (folder / INDEX).stat().st_size
        loaded = load_merged_index(folder, spec)
        if loaded is None:
            merged = "stale"
        else:
            same = (
                loaded.keys.shape == index.keys.shape
                and bool((loaded.keys == index.keys).all())
                and np.array_equal(loaded.shard, index.shard)
                and np.array_equal(loaded.row, index.row)
                and [s.content_sha256 for s in loaded.shards] == [s.content_sha256 for s in index.shards]
            )
            if not same:
                raise IndexConsistencyError(
                    f"{folder / INDEX}: its entries differ from the shards' keys; rerun finalize"
                )
            merged = "current"
    temporary = len(temp_shards(folder))
    return VerifyReport(
        folder=str(folder),
        shards=len(shards),
        records=int(index.keys.shape[0]),
        positions=positions,
        bytes=total_bytes,
        records_per_rank=per_rank,
        merged_index=merged,
        temporary_files=temporary,
    )
