"""Errors a user of the teacher cache can cause: each is one line naming the file, folder or record."""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CacheMismatchError",
    "CorruptShardError",
    "IndexConsistencyError",
    "MissingRecordError",
    "RecordError",
]


class CacheError(ValueError):
    """Base class: a cache folder, shard or record that is not what was expected."""


class CacheMismatchError(CacheError):
    """The cache was written for another teacher, tokenizer, k, vocabulary, ... than the caller expects."""


class MissingRecordError(CacheError):
    """A record key is not in the cache."""

    def __init__(self, key: str, folder: str) -> None:
        super().__init__(f"record {key} is not in the teacher cache {folder}")
        self.key = key


class CorruptShardError(CacheError):
    """A shard (or the merged index) is truncated, corrupted or not a cache file."""


class IndexConsistencyError(CacheError):
    """The shards and the index disagree: a missing shard, a duplicate key, an entry outside its shard."""


class RecordError(CacheError):
    """A record handed to the writer has the wrong shape, dtype or values."""
