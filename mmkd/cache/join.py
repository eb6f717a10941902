"""A teacher cache as a training stage reads it: the header checked against the recipe's teacher, every record of the
dataset looked up before training, and each batch joined with its records.

The join is by content: a collator built with ``keys=True`` gives each sample the key of exactly what the teacher
sees (its token ids, the logits rows the losses read, its images; :meth:`mmkd.data.MultimodalCollator.cache_key`),
and :class:`CacheJoin` attaches the records of those keys to the batch
(:class:`~mmkd.contract.TeacherTopK`, or the teacher's sequence log-probabilities of a preference pair). The same
collator, built the same way, computes the keys when ``mmkd cache`` writes the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from mmkd.cache.errors import CacheError, MissingRecordError
from mmkd.cache.folder import read_header
from mmkd.cache.reader import CacheReader
from mmkd.cache.spec import CacheSpec
from mmkd.contract import DistillBatch, PreferenceBatch, TeacherTopK

__all__ = ["STORED_ANSWER", "STORED_SEQUENCE", "CacheJoin", "CachedTeacher", "KeptRecords", "Selection",
           "dataset_keys", "teacher_spec"]

# What a record stores (``CacheSpec.stored``): the top-k at the answer positions of a labelled sample, or the
# teacher's summed answer log-probabilities of a preference pair's two answers.
STORED_ANSWER = ("answer",)
STORED_SEQUENCE = ("sequence_logprobs",)


def teacher_spec(view: Any, *, k: int, stored: Sequence[str], batching: Mapping[str, Any] | None = None,
                 codec: Any = None) -> CacheSpec:
    """The header a cache of this teacher has: its identity, tokenizer and processor fingerprints, vocabulary, k.

    Args:
        view: The teacher's input side (:class:`mmkd.models.ImageTextInputs`, or a model's ``inputs_view``), loaded
            from a folder or hub id (its ``identity``).
        k: Top-k entries per position.
        stored: What each record stores (:data:`STORED_ANSWER`, :data:`STORED_SEQUENCE`).
        batching: Collator settings that decide the keys (``max_length``, ``on_overflow``): recorded, so a change
            reads as a stale cache rather than as missing records.
        codec: The writer's codec (None: packed).
    """
    identity = getattr(view, "identity", None)
    if not identity:
        raise CacheError("the teacher was not loaded from a folder or hub id, so a cache cannot name it; save it with "
                         "save_pretrained and set teacher.init_args.path to that folder")
    prints = view.fingerprints()
    extra = {"quantize": identity.get("quantize"), "weights": identity.get("weights"), **dict(batching or {})}
    return CacheSpec(teacher=identity["teacher"], revision=identity.get("revision"), dtype=identity.get("dtype"),
                     tokenizer=prints["tokenizer"], processor=prints["processor"], vocab_size=len(view.tokenizer),
                     k=k, stored=tuple(stored), codec=codec, extra=extra)


class _Keys:
    """Records -> ``[(record id, cache key or None)]`` (a DataLoader collate function, picklable)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, records: Sequence[Any]) -> list[tuple[str, str | None]]:
        return [("?" if r is None else str(r.get("id", "?")), self.collator.cache_key(r)) for r in records]


def dataset_keys(dataset: Dataset, collator: Any, *, num_workers: int = 0, batch_size: int = 64,
                 progress: Callable[[int], None] | None = None) -> list[tuple[str, str | None]]:
    """``(record id, cache key)`` of every record of ``dataset`` in index order (key None: the collator drops the
    record). Reads every record (images decoded for their hash) in ``num_workers`` loader processes; no image
    processing, no model."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_Keys(collator))
    out: list[tuple[str, str | None]] = []
    for part in loader:
        out.extend(part)
        if progress is not None:
            progress(len(part))
    return out


class KeptRecords(Dataset):
    """The records of a dataset at ``indices``, in that order; other attributes are the dataset's."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)


@dataclass
class Selection:
    """What the pre-training check of a dataset against a cache found (recorded in the manifest).

    Attributes:
        records: Records in the dataset.
        found: Records whose entry is in the cache.
        missing: Records without an entry (skipped with ``on_missing: skip``).
        dropped: Records the collator drops anyway (unreadable, too long): not looked up.
        first_missing: Up to five missing record ids.
    """

    records: int = 0
    found: int = 0
    missing: int = 0
    dropped: int = 0
    first_missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "found": self.found, "missing": self.missing, "dropped": self.dropped,
                "first_missing": list(self.first_missing)}


class CachedTeacher:
    """A teacher cache opened for a stage: its header checked, then records looked up by key.

    Args:
        folder: The cache folder.
        view: The recipe teacher's input side (identity and fingerprints; no weights).
        k: The k the stage's objective asks for, or None for the cache's.
        stored: What the stage reads from each record.
        batching: The collator settings that decide the keys (as :func:`teacher_spec`).

    Raises:
        CacheError: No cache there, or it was written for another teacher, tokenizer, processor, k, ... (one line
            listing every difference).
    """

    def __init__(self, folder: str | Path, view: Any, *, k: int | None, stored: Sequence[str],
                 batching: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        header = read_header(self.folder) if self.folder.is_dir() else None
        if header is None:
            raise CacheError(f"{self.folder}: no teacher cache here (run `mmkd cache RECIPE --stage NAME` first)")
        expect = teacher_spec(view, k=k if k is not None else header.k, stored=stored, batching=batching)
        self.reader = CacheReader(self.folder, expect=expect)
        self.spec = self.reader.spec
        self.reader.check_shards()  # a truncated or replaced shard fails here, not mid-training

    def check(self, dataset: Dataset, collator: Any, *, on_missing: Literal["error", "skip"] = "error",
              num_workers: int = 0, where: str = "") -> tuple[Dataset, Selection]:
        """Look every record of ``dataset`` up before training.

        Returns:
            The dataset (without the missing records under ``on_missing="skip"``) and what was found.

        Raises:
            MissingRecordError: A record has no entry and ``on_missing="error"`` (names the record and its key).
        """
        keys = dataset_keys(dataset, collator, num_workers=num_workers)
        sel = Selection(records=len(keys))
        kept: list[int] = []
        for i, (rid, key) in enumerate(keys):
            if key is None:
                sel.dropped += 1
                kept.append(i)  # the collator drops it and counts it, as without a cache
            elif key in self.reader:
                sel.found += 1
                kept.append(i)
            else:
                sel.missing += 1
                if len(sel.first_missing) < 5:
                    sel.first_missing.append(rid)
                if on_missing == "error":
                    err = MissingRecordError(key, str(self.folder))
                    err.args = (f"{where}record '{rid}' (index {i}) is not in the teacher cache {self.folder}: no "
                                f"entry for its key {key[:16]}..., so the record, its prompt or the teacher's inputs "
                                "changed since the cache was written; rerun `mmkd cache`, or set "
                                "task_args.on_missing: skip",)
                    raise err
        if sel.missing:
            return KeptRecords(dataset, kept), sel
        return dataset, sel

    def topk(self, keys: Sequence[str], counts: Sequence[int]) -> TeacherTopK:
        """The records of ``keys`` stacked in order; each must store ``counts[i]`` positions."""
        records = [self.reader.get(key) for key in keys]
        for key, record, n in zip(keys, records, counts):
            if record.ids.shape[0] != n:
                raise CacheError(f"{self.folder}: record {key} stores {record.ids.shape[0]} positions, the sample has"
                                 f" {n} answer tokens")
        if not records:
            k = self.spec.k
            return TeacherTopK(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
        return TeacherTopK(torch.cat([r.ids for r in records]), torch.cat([r.logprobs for r in records]).float(),
                           torch.cat([r.log_tail for r in records]).float())

    def sequence_logprobs(self, keys: Sequence[str]) -> torch.Tensor:
        """``(B, 2)`` float32: the teacher's chosen and rejected answer log-probabilities of each pair."""
        rows = []
        for key in keys:
            record = self.reader.get(key)
            if record.sequence_logprobs is None:
                raise CacheError(f"{self.folder}: record {key} stores no sequence log-probabilities")
            rows.append(record.sequence_logprobs.float())
        return torch.stack(rows) if rows else torch.zeros(0, 2)


def _answer_counts(labels: torch.Tensor) -> list[int]:
    return (labels[:, 1:] != -100).sum(1).tolist()


def _standin_topk(n: int, k: int) -> TeacherTopK:
    """Targets for a stand-in batch (its loss is weighed by 0): uniform over the first k ids."""
    ids = torch.arange(k).expand(n, k).clone()
    return TeacherTopK(ids, torch.full((n, k), -float(torch.log(torch.tensor(float(k))))), torch.full((n,), -30.0))


class CacheJoin:
    """A collator that joins each batch with its cache records (picklable into DataLoader workers).

    Args:
        collator: The stage's collator, built with ``keys=True``.
        cached: The opened cache.
    """

    def __init__(self, collator: Any, cached: CachedTeacher) -> None:
        self.collator = collator
        self.cached = cached

    @property
    def stats(self) -> dict[str, int]:
        return self.collator.stats

    def cache_key(self, record: Any) -> str | None:
        return self.collator.cache_key(record)

    def __call__(self, records: Sequence[Any]) -> DistillBatch | PreferenceBatch:
        batch = self.collator(records)
        if isinstance(batch, PreferenceBatch):
            if batch.standin:
                zeros = torch.zeros(batch.size)
                batch.chosen.teacher_logprobs, batch.rejected.teacher_logprobs = zeros, zeros.clone()
            else:
                seq = self.cached.sequence_logprobs(batch.keys)
                batch.chosen.teacher_logprobs, batch.rejected.teacher_logprobs = seq[:, 0], seq[:, 1]
            return batch
        labels = batch.teacher_side()[1]
        if batch.standin:
            batch.teacher_topk = _standin_topk(sum(_answer_counts(labels)), self.cached.spec.k)
        else:
            batch.teacher_topk = self.cached.topk(batch.keys, _answer_counts(labels))
        return batch
