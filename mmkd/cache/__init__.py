"""The teacher cache: a teacher's top-k log-probs (and sequence log-probs) stored once, read back by record key."""

from mmkd.cache.errors import (
    CacheError,
    CacheMismatchError,
    CorruptShardError,
    IndexConsistencyError,
    MissingRecordError,
    RecordError,
)
from mmkd.cache.keys import record_key

__all__ = [
    "CacheError",
    "CacheMismatchError",
    "CorruptShardError",
    "IndexConsistencyError",
    "MissingRecordError",
    "RecordError",
    "record_key",
]
