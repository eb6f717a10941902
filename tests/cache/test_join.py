"""The cache as a stage reads it: record keys from the collator, the header check against the recipe's teacher, the
join of a batch with its records, and the loss from a packed cache against the live teacher's."""

import pytest
import torch

from mmkd.cache import CacheMismatchError, CacheWriter, PackedCodec, RawCodec, finalize
from mmkd.cache.join import STORED_ANSWER, CachedTeacher, CacheJoin, teacher_spec
from mmkd.data import MultimodalCollator, ScienceQA
from mmkd.models import ImageTextInputs
from mmkd.objectives import TopKKLObjective, answer_positions
from mmkd.objectives.tokens import answer_topk

BATCHING = {"max_length": 160, "on_overflow": "truncate"}


@pytest.fixture(scope="module")
def records(tiny_assets):
    data = ScienceQA(tiny_assets["sqa"], "train")
    return [data[i] for i in range(12)]


@pytest.fixture(scope="module")
def view(tiny_assets):
    return ImageTextInputs.from_pretrained(tiny_assets["teacher"])


def key_collator(student, teacher):
    return MultimodalCollator.for_models(student, teacher, max_length=160, keys=True)


def write_cache(folder, teacher, collator, records, codec, k=64, batch_size=6):
    """What ``mmkd cache`` writes, in process: the teacher's top-k at each record's answer positions."""
    spec = teacher_spec(teacher.inputs_view, k=k, stored=STORED_ANSWER, batching=BATCHING, codec=codec)
    with CacheWriter(folder, spec) as writer:
        for start in range(0, len(records), batch_size):
            batch = collator(records[start:start + batch_size])
            inputs, labels = batch.teacher_side()
            with torch.no_grad():
                out = teacher(**inputs.kwargs())
            mask = answer_positions(labels)
            ids, lp, tail = answer_topk(out, mask, k)
            row_of = mask.nonzero()[:, 0]
            for row, key in enumerate(batch.keys):
                rows = row_of == row
                writer.add(key, mask[row].nonzero().flatten(), ids[rows], lp[rows], tail[rows])
    finalize(folder)
    return spec


def test_keys_follow_what_the_teacher_sees(models, view, records):
    teacher, student = models
    collator = key_collator(student, teacher)
    a = collator(records[:4]).keys
    assert len(a) == 4 and len(set(a)) == 4
    assert collator(records[:4]).keys == a
    # the weight-free input side of the teacher gives the same keys as the loaded teacher
    assert key_collator(student, view)(records[:4]).keys == a
    assert [collator.cache_key(r) for r in records[:4]] == a
    changed = dict(records[0], messages=[dict(m) for m in records[0]["messages"]])
    changed["messages"][0]["content"] += " Think."
    assert collator.cache_key(changed) != a[0]
    if records[0]["images"]:
        flipped = dict(records[0], images=[records[0]["images"][0].transpose(0)])
        assert collator.cache_key(flipped) != a[0]
    # a stand-in batch carries no keys
    assert collator([None]).keys == []


@pytest.mark.parametrize("codec", [RawCodec(), PackedCodec()], ids=["raw", "packed"])
def test_loss_from_the_cache_equals_the_live_teachers(models, view, records, tmp_path, codec):
    teacher, student = models
    collator = key_collator(student, teacher)
    write_cache(tmp_path / "c", teacher, collator, records, codec)
    join = CacheJoin(key_collator(student, view), CachedTeacher(tmp_path / "c", view, k=None, stored=STORED_ANSWER,
                                                                batching=BATCHING))
    objective = TopKKLObjective(k=64)
    for i in (0, 6):
        live_batch, cached_batch = collator(records[i:i + 6]), join(records[i:i + 6])
        assert cached_batch.teacher_topk.ids.shape == (int(answer_positions(cached_batch.labels).sum()), 64)
        with torch.no_grad():
            s_out = student(**live_batch.inputs.kwargs())
            t_out = teacher(**live_batch.teacher_side()[0].kwargs())
            live = objective(s_out, t_out, live_batch)
            cached = objective(s_out, None, cached_batch)
        cached, live = float(cached), float(live)
        if isinstance(codec, RawCodec):  # the same teacher batches, the same float32 numbers: the same loss
            assert cached == live
        else:  # the packed codec's quantization: within 1e-3 relative (measured: bench/cache.py)
            assert abs(cached - live) <= 1e-3 * abs(live), (cached, live)
            assert cached != live


def test_a_stale_cache_names_what_differs(models, view, records, tmp_path):
    teacher, student = models
    write_cache(tmp_path / "c", teacher, key_collator(student, teacher), records[:2], RawCodec(), k=16)
    with pytest.raises(CacheMismatchError, match="k is 16, expected 8"):
        CachedTeacher(tmp_path / "c", view, k=8, stored=STORED_ANSWER, batching=BATCHING)
    with pytest.raises(CacheMismatchError, match="extra.max_length is 160, expected 96"):
        CachedTeacher(tmp_path / "c", view, k=None, stored=STORED_ANSWER, batching={**BATCHING, "max_length": 96})
    other = ImageTextInputs.from_pretrained(view.identity["teacher"])
    other.tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(CacheMismatchError, match="tokenizer is"):
        CachedTeacher(tmp_path / "c", other, k=None, stored=STORED_ANSWER, batching=BATCHING)
    assert CachedTeacher(tmp_path / "c", view, k=16, stored=STORED_ANSWER, batching=BATCHING).spec.k == 16


def test_a_stand_in_batch_gets_finite_targets(models, view, records, tmp_path):
    teacher, student = models
    write_cache(tmp_path / "c", teacher, key_collator(student, teacher), records[:1], RawCodec(), k=8)
    join = CacheJoin(key_collator(student, view), CachedTeacher(tmp_path / "c", view, k=None, stored=STORED_ANSWER,
                                                                batching=BATCHING))
    batch = join([None])
    assert batch.standin and batch.keys == []
    with torch.no_grad():
        value = TopKKLObjective()(student(**batch.inputs.kwargs()), None, batch)
    assert torch.isfinite(value)
