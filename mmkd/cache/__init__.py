"""The teacher cache: a teacher's top-k log-probs (and sequence log-probs) stored once, read back by record key.

Write (one writer per rank; rank 0 may finalize once every rank has closed)::

    spec = CacheSpec(teacher="Qwen/Qwen2-VL-7B-Instruct", revision=sha, dtype="bfloat16", tokenizer=tok_fp,
                     processor=proc_fp, vocab_size=151936, k=64)
    with CacheWriter(folder, spec, rank=rank) as writer:
        for sample in my_share_of_the_data:
            key = record_key(sample.input_ids, sample.images, positions)
            if key in writer:
                continue  # written before a kill: skip the teacher forward
            ids, logprobs, log_tail = teacher_topk(logits[positions], spec.k)  # logits: (T, V) of this sample
            writer.add(key, positions, ids, logprobs, log_tail)
    finalize(folder)  # optional merged index

Read (any process; the reader pickles into DataLoader workers)::

    cache = CacheReader(folder, expect=spec)
    record = cache.get(key)  # positions, ids, logprobs, log_tail, sequence_logprobs

Format: see :mod:`mmkd.cache.folder` (folder), :mod:`mmkd.cache.shard` (shard tensors), :mod:`mmkd.cache.codec`
(how a top-k is packed) and :mod:`mmkd.cache.keys` (what a key hashes).
"""

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
from mmkd.cache.reader import CacheReader, CacheRecord
from mmkd.cache.spec import CacheSpec
from mmkd.cache.verify import VerifyReport, verify
from mmkd.cache.writer import CacheWriter, finalize

__all__ = [
    "CODECS",
    "CacheError",
    "CacheMismatchError",
    "CacheReader",
    "CacheRecord",
    "CacheSpec",
    "CacheWriter",
    "CorruptShardError",
    "IndexConsistencyError",
    "MissingRecordError",
    "PackedCodec",
    "RawCodec",
    "RecordError",
    "TopKCodec",
    "VerifyReport",
    "build_codec",
    "finalize",
    "record_key",
    "teacher_topk",
    "verify",
]
