import json
import os
import pickle

import numpy as np
import pytest
import torch

from mmkd.cache import (
    CacheError,
    CacheMismatchError,
    CacheReader,
    CacheSpec,
    CacheWriter,
    CorruptShardError,
    IndexConsistencyError,
    MissingRecordError,
    PackedCodec,
    RecordError,
    finalize,
    record_key,
    verify,
)


def _write(folder, spec, records, rank=0, shard_records=5):
    with CacheWriter(folder, spec, rank=rank, shard_records=shard_records) as writer:
        for r in records:
            writer.add(**r)
    return writer


def _one_line(e):
    return "\n" not in str(e.value)


def _check_record(got, rec, exact):
    assert got.key == rec["key"]
    assert got.positions.tolist() == list(rec["positions"]) and got.positions.dtype == torch.long
    n = len(rec["positions"])
    assert got.ids.shape == (n, 8) and got.ids.dtype == torch.long and got.logprobs.dtype == torch.float32
    if n:
        if exact:
            assert torch.equal(got.ids, rec["ids"]) and torch.equal(got.logprobs, rec["logprobs"])
            assert torch.equal(got.log_tail, rec["log_tail"])
        else:
            a, b = got.ids.sort(1), rec["ids"].sort(1)
            assert torch.equal(a.values, b.values)
            assert (got.logprobs.gather(1, a.indices) - rec["logprobs"].gather(1, b.indices)).abs().max() < 0.2
            assert (got.log_tail - rec["log_tail"]).abs().max() < 1e-3
    if "sequence_logprobs" in rec:
        assert got.sequence_logprobs.dtype == torch.float64
        assert got.sequence_logprobs.tolist() == list(rec["sequence_logprobs"])  # exact in every codec
    else:
        assert got.sequence_logprobs is None


def test_write_read_finalize_verify(tmp_path, spec, records):
    folder = tmp_path / "cache"
    _write(folder, spec, records)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["header.json"] + [f"shard-r00000-{i:06d}.safetensors" for i in range(5)]
    reader = CacheReader(folder, expect=spec)
    assert len(reader) == 23 and sorted(reader.keys()) == sorted(r["key"] for r in records)
    for rec in records:
        _check_record(reader.get(rec["key"]), rec, exact=spec.codec.name == "raw")
    report = verify(folder)
    assert (report.shards, report.records, report.merged_index) == (5, 23, "absent")
    assert report.positions == sum(len(r["positions"]) for r in records)
    finalize(folder)
    report = verify(folder)
    assert report.merged_index == "current" and "OK, 23 records" in report.summary()
    merged = CacheReader(folder, expect=spec)
    assert merged.index.shards == reader.index.shards
    for rec in records[:4]:
        _check_record(merged.get(rec["key"]), rec, exact=spec.codec.name == "raw")


def test_missing_record_names_the_key(tmp_path, spec_for, records):
    _write(tmp_path / "c", spec_for(), records[:3])
    key = record_key([999])
    with pytest.raises(MissingRecordError, match=f"record {key} is not in the teacher cache") as e:
        CacheReader(tmp_path / "c").get(key)
    assert _one_line(e) and key not in CacheReader(tmp_path / "c")
    with pytest.raises(CacheError, match="expected 64 hex characters"):
        CacheReader(tmp_path / "c").get("not-a-key")


def test_stale_header_says_what_differs(tmp_path, spec_for, records):
    folder = tmp_path / "c"
    _write(folder, spec_for(), records[:3])
    other = spec_for(tokenizer="tok-sha:9999", k=16, processor={"size": 384, "sha": "2222"})
    with pytest.raises(CacheMismatchError) as e:
        CacheReader(folder, expect=other)
    msg = str(e.value)
    assert _one_line(e) and str(folder / "header.json") in msg
    assert "k is 8, expected 16" in msg and 'tokenizer is "tok-sha:1111", expected "tok-sha:9999"' in msg
    assert "processor.size is 336, expected 384" in msg and "processor.sha" not in msg  # only what differs
    # The reader ignores the codec (it decodes any); the writer refuses to mix two codecs in one folder.
    CacheReader(folder, expect=spec_for(codec=PackedCodec(logprob_step=0.05)))
    before = sorted(os.listdir(folder))
    for bad in (other, spec_for(codec=PackedCodec(logprob_step=0.05))):
        with pytest.raises(CacheMismatchError, match="write into a fresh folder"):
            CacheWriter(folder, bad)
    assert sorted(os.listdir(folder)) == before


def test_truncated_shard_is_named(tmp_path, spec_for, records):
    folder = tmp_path / "c"
    _write(folder, spec_for(), records)
    finalize(folder)
    shard = folder / "shard-r00000-000002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 40])
    for action in (lambda: CacheReader(folder), lambda: verify(folder)):
        with pytest.raises(CorruptShardError, match=f"{shard}: not a complete cache shard") as e:
            action()
        assert _one_line(e)


def test_corrupted_byte_fails_the_checksum(tmp_path, spec_for, records):
    folder = tmp_path / "c"
    _write(folder, spec_for(), records)
    shard = folder / "shard-r00000-000001.safetensors"
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_len])["col.bits"]["data_offsets"]
    data[8 + header_len + start + 3] ^= 0x40  # one bit of the first record's packed top-k
    shard.write_bytes(bytes(data))
    reader = CacheReader(folder)
    bad = []
    for rec in records:
        try:
            reader.get(rec["key"])
        except CorruptShardError as e:
            assert str(shard) in str(e) and "fails its checksum" in str(e) and "\n" not in str(e)
            bad.append(rec["key"])
    assert len(bad) == 1
    with pytest.raises(CorruptShardError, match=f"{shard}: content sha256 .* the shard is corrupted"):
        verify(folder)


def test_bad_records_name_the_key_and_write_nothing(tmp_path, spec_for, records):
    rec = records[1]
    cases = [
        (dict(positions=rec["positions"][:-1]), "rows of top-k for"),
        (dict(positions=rec["positions"][::-1]), "strictly increasing"),
        (dict(ids=rec["ids"] + 1000), r"expected ids in \[0, 500\)"),
        (dict(logprobs=rec["logprobs"] * float("nan")), "NaN"),
        (dict(ids=None), "go together"),
        (dict(sequence_logprobs=(1.0,)), "two finite floats"),
    ]
    folder = tmp_path / "c"
    with CacheWriter(folder, spec_for(), shard_records=2) as writer:
        for change, match in cases:
            with pytest.raises(RecordError, match=match) as e:
                writer.add(**{**rec, **change})
            assert rec["key"] in str(e.value) and _one_line(e)
        assert writer.add(**rec) and not writer.add(**rec)  # a key already written is skipped
        assert writer.skipped == 1 and rec["key"] in writer
    assert len(CacheReader(folder)) == 1


def test_unwritable_folder_fails_before_writing(tmp_path, spec_for):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CacheError, match="cannot write the teacher cache here") as e:
        CacheWriter(blocker / "cache", spec_for())
    assert _one_line(e)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CacheError, match="cannot write"):
            CacheWriter(locked, spec_for())
        assert os.listdir(locked) == []


def test_leaving_with_an_exception_keeps_shard_boundaries(tmp_path, spec_for, records):
    folder = tmp_path / "c"
    with pytest.raises(RuntimeError):
        with CacheWriter(folder, spec_for(), shard_records=5) as writer:
            for r in records[:8]:
                writer.add(**r)
            raise RuntimeError("teacher crashed")
    assert len(CacheReader(folder)) == 5  # the partial second shard was dropped, not written short
    writer = _write(folder, spec_for(), records)
    assert writer.skipped == 5 and len(CacheReader(folder)) == 23


def test_duplicates_and_gaps_across_ranks(tmp_path, spec_for, records):
    folder = tmp_path / "c"
    _write(folder, spec_for(), records[:6], rank=0)
    _write(folder, spec_for(), records[5:9], rank=1)  # records[5] written by both ranks
    for action in (lambda: CacheReader(folder), lambda: verify(folder), lambda: finalize(folder)):
        with pytest.raises(IndexConsistencyError, match=f"record {records[5]['key']} is in two shards") as e:
            action()
        assert _one_line(e)
    (folder / "shard-r00001-000000.safetensors").unlink()
    _write(folder, spec_for(), records[10:22], rank=1)  # rank 1 starts again: shards 0..2
    (folder / "shard-r00001-000001.safetensors").unlink()
    with pytest.raises(IndexConsistencyError, match="rank 1 has no shard 1 before shard 2"):
        verify(folder)
    with pytest.raises(IndexConsistencyError, match="remove the later shards of this rank too"):
        CacheWriter(folder, spec_for(), rank=1)


def test_stale_merged_index_is_ignored(tmp_path, spec_for, records):
    folder = tmp_path / "c"
    _write(folder, spec_for(), records[:10])
    finalize(folder)
    _write(folder, spec_for(), records)  # resumes: 13 more records in new shards
    reader = CacheReader(folder)
    assert len(reader) == 23 and reader.get(records[-1]["key"]).key == records[-1]["key"]
    assert verify(folder).merged_index == "stale"
    finalize(folder)
    assert verify(folder).merged_index == "current"


def test_shard_from_another_header_is_refused(tmp_path, spec_for, records):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, spec_for(), records[:3])
    _write(b, spec_for(teacher="org/other"), records[:3])
    os.replace(b / "shard-r00000-000000.safetensors", a / "shard-r00001-000000.safetensors")
    with pytest.raises(CorruptShardError, match="written under another header.json"):
        CacheReader(a)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_reader_in_dataloader_workers(tmp_path, spec_for, records, context):
    folder = tmp_path / "c"
    _write(folder, spec_for(), records)
    reader = CacheReader(folder)
    keys = [r["key"] for r in records]
    expected = {k: reader.get(k).logprobs for k in keys}  # the parent has shards open before the workers start
    assert reader._open and not pickle.loads(pickle.dumps(reader))._open
    # The reader is a map-style dataset over keys: reader[key] is reader.get(key).
    loader = torch.utils.data.DataLoader(
        reader, sampler=keys, batch_size=None, num_workers=2, multiprocessing_context=context
    )
    got = {rec.key: rec.logprobs for rec in loader}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in keys)


def test_spec_roundtrip_and_validation(spec_for):
    spec = spec_for(stored=("answer", "visual"), extra={"dataset": {"rows": 3}})
    assert CacheSpec.from_json(spec.to_json()) == spec and spec.digest() == CacheSpec.from_json(spec.to_json()).digest()
    with pytest.raises(ValueError, match="k=0"):
        spec_for(k=0)
    with pytest.raises(ValueError, match="format None"):
        CacheSpec.from_json({"teacher": "x"})
    assert np.array_equal(np.frombuffer(bytes.fromhex(record_key([1])), np.uint8).shape, (32,))
