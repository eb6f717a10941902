"""The teacher cache: a teacher's top-k log-probs (and sequence log-probs) stored once, read back by record key."""

from mmkd.cache.codec import CODECS, PackedCodec, RawCodec, TopKCodec, build_codec, teacher_topk
from mmkd.cache.errors import (
    CacheError,
    CacheMismatchError,
    CorruptShardError,
    IndexConsistencyError,
    MissingRecordError,
    RecordError,
)
from mmkd.cache.keys import record_key
from mmkd.cache.spec import CacheSpec

__all__ = [
    "CODECS",
    "CacheError",
    "CacheMismatchError",
    "CacheSpec",
    "CorruptShardError",
    "IndexConsistencyError",
    "MissingRecordError",
    "PackedCodec",
    "RawCodec",
    "RecordError",
    "TopKCodec",
    "build_codec",
    "record_key",
    "teacher_topk",
]
