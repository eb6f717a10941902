import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import make_processor
from PIL import Image

from mmkd.contract import DistillBatch, PreferenceBatch, PromptBatch
from mmkd.data.collate import IGNORE_INDEX, MultimodalCollator, PreferenceCollator, TeacherSide

IMG = Image.new("RGB", (20, 20), (0, 200, 0))


def rec(rid="r", answer="The answer is B.", image=True, prompt="How many red circles are there?"):
    content = ("<image>\n" if image else "") + prompt
    return {"id": rid, "images": [IMG] if image else [],
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}  # fmt: skip


def labelled(tok, labels_row: torch.Tensor) -> str:
    return tok.decode(labels_row[labels_row != IGNORE_INDEX])


def collator(tok, **kw):
    return MultimodalCollator(tok, image_processor=make_processor(8), num_image_tokens=4, **kw)


def test_labels_are_exactly_the_answers(tokenizer) -> None:
    multi = rec("m", image=False)
    multi["messages"] += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    batch = collator(tokenizer)([rec("a"), rec("b", answer="B", image=False), multi])
    assert isinstance(batch, DistillBatch) and batch.teacher_inputs is None and batch.ids == ["a", "b", "m"]
    assert labelled(tokenizer, batch.labels[0]) == "The answer is B.<|end|>"
    assert labelled(tokenizer, batch.labels[1]) == "B<|end|>"
    assert labelled(tokenizer, batch.labels[2]) == "The answer is B.<|end|>Yes.<|end|>"
    # labels sit on the answer positions themselves (HF shift happens in the model)
    mask = batch.labels != IGNORE_INDEX
    assert torch.equal(batch.labels[mask], batch.inputs.input_ids[mask])
    # right padding, attention mask on real tokens only, pixel values for the one image
    assert batch.inputs.attention_mask[1, -1] == 0 and batch.inputs.attention_mask[:, 0].all()
    assert batch.inputs.images["pixel_values"].shape == (1, 3, 8, 8)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (batch.inputs.input_ids[0] == image_id).sum() == 4 and (batch.inputs.input_ids[1] == image_id).sum() == 0
    assert batch.data_stats == {"samples": 3, "truncated": 0, "skipped_overflow": 0, "bad": 0}


def test_teacher_side_selects_same_answer_tokens(tokenizer) -> None:
    teacher = TeacherSide(tokenizer, make_processor(16), num_image_tokens=9)
    batch = collator(tokenizer, teacher=teacher)([rec("a"), rec("b", answer="B", image=False)])
    t_in = batch.teacher_inputs
    assert t_in.images["pixel_values"].shape == (1, 3, 16, 16)
    assert batch.inputs.images["pixel_values"].shape == (1, 3, 8, 8)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (t_in.input_ids[0] == image_id).sum() == 9
    for b in range(2):
        s = batch.labels[b][batch.labels[b] != IGNORE_INDEX]
        t = batch.teacher_labels[b][batch.teacher_labels[b] != IGNORE_INDEX]
        assert torch.equal(s, t) and len(s) > 0
    assert t_in.input_ids.shape[1] == batch.inputs.input_ids.shape[1] + 5


def test_generation_prompts_left_padded(tokenizer) -> None:
    batch = collator(tokenizer, train=False)([rec("a"), rec("b", image=False, prompt="Hi")])
    assert isinstance(batch, PromptBatch) and set(batch.inputs.images) == {"pixel_values"}
    assert batch.ids == ["a", "b"]
    assert batch.inputs.attention_mask[1, 0] == 0 and batch.inputs.attention_mask[:, -1].all()
    row = batch.inputs.input_ids[1][batch.inputs.attention_mask[1].bool()]
    assert tokenizer.decode(row) == "<|user|>\nHi<|end|><|assistant|>\n"


def test_overflow_truncates_answer_side_or_skips(tokenizer) -> None:
    long = rec("long", answer="The answer is B. " * 20)
    c = collator(tokenizer, max_length=30)
    batch = c([long, rec("short", answer="B")])
    assert batch.inputs.input_ids.shape[1] == 30 and batch.data_stats["truncated"] == 1
    kept = labelled(tokenizer, batch.labels[0])
    assert kept and ("The answer is B. " * 20).startswith(kept)
    skip = collator(tokenizer, max_length=30, on_overflow="skip")
    batch = skip([long, rec("short", answer="B")])
    assert batch.inputs.input_ids.shape[0] == 1 and batch.data_stats["skipped_overflow"] == 1
    # a prompt that alone exceeds the limit leaves no answer token: skipped, even when truncating (the batch then
    # holds the stand-in, tested below)
    batch = collator(tokenizer, max_length=12)([rec("p")])
    assert batch.data_stats["skipped_overflow"] == 1 and batch.data_stats["samples"] == 0
    assert c.stats["truncated"] == 1 and skip.stats["skipped_overflow"] == 1


def test_truncation_keeps_same_answer_tokens_on_both_sides(tokenizer) -> None:
    teacher = TeacherSide(tokenizer, make_processor(16), num_image_tokens=12, max_length=30)
    batch = collator(tokenizer, max_length=40, teacher=teacher)([rec("long", answer="The answer is B. " * 10)])
    s = batch.labels[0][batch.labels[0] != IGNORE_INDEX]
    t = batch.teacher_labels[0][batch.teacher_labels[0] != IGNORE_INDEX]
    assert torch.equal(s, t) and batch.teacher_inputs.input_ids.shape[1] <= 30


def test_bad_records_are_counted(tokenizer) -> None:
    batch = collator(tokenizer)([None, rec("a")])
    assert batch.inputs.input_ids.shape[0] == 1 and batch.data_stats["bad"] == 1


def test_placeholder_mismatch_and_missing_image_token(tokenizer) -> None:
    r = rec("x")
    r["images"] = [IMG, IMG]
    with pytest.raises(ValueError, match=r"record 'x': 1 '<image>' tokens after templating but 2 images"):
        collator(tokenizer)([r])
    with pytest.raises(ValueError, match=r"'<img>' is \d+ tokens; expected one special token"):
        collator(tokenizer, image_token="<img>")


def test_default_template_and_trailing_newline_templates(tokenizer) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None  # falls back to mmkd's documented default
    assert labelled(plain, collator(plain)([rec("a", answer="B")]).labels[0]) == "B<|end|>"
    chatml = copy.deepcopy(tokenizer)  # ChatML-like: a newline follows the end-of-turn token
    chatml.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    batch = collator(chatml)([rec("a", answer="B")])
    assert labelled(chatml, batch.labels[0]) == "B<|end|>"


def test_preference_collator(tokenizer) -> None:
    pair = {"id": "p", "images": [IMG], "messages": [{"role": "user", "content": "<image>\nWhat?"}],
            "chosen": "A green square.", "rejected": "A red circle."}  # fmt: skip
    c = PreferenceCollator(tokenizer, image_processor=make_processor(8), num_image_tokens=4,
                           teacher=TeacherSide(tokenizer, make_processor(16), 6))  # fmt: skip
    batch = c([pair, None])
    assert isinstance(batch, PreferenceBatch)
    assert labelled(tokenizer, batch.chosen.labels[0]) == "A green square.<|end|>"
    assert labelled(tokenizer, batch.rejected.labels[0]) == "A red circle.<|end|>"
    assert batch.chosen.inputs.images["pixel_values"] is batch.rejected.inputs.images["pixel_values"]
    assert labelled(tokenizer, batch.rejected.teacher_labels[0]) == "A red circle.<|end|>"
    assert batch.chosen.teacher_inputs.images["pixel_values"].shape[-1] == 16 and batch.data_stats["bad"] == 1


def test_for_models_adds_teacher_only_when_inputs_differ(tokenizer) -> None:
    def model(size: int, n: int):
        return SimpleNamespace(tokenizer=tokenizer, preprocess_images=make_processor(size), num_image_tokens=n,
                               image_token="<image>")  # fmt: skip

    same = MultimodalCollator.for_models(model(8, 4), model(8, 4))([rec("a")])
    assert same.teacher_inputs is None and same.teacher_labels is None
    diff = MultimodalCollator.for_models(model(8, 4), model(16, 4))([rec("a")])
    assert diff.teacher_inputs.images["pixel_values"].shape[-1] == 16


def test_a_batch_whose_samples_are_all_dropped_holds_the_stand_in(tokenizer) -> None:
    """Every rank must still run a step: the batch is one tiny text-only sample, flagged, counted as no sample."""
    long = rec("long", prompt="count the circles " * 40)
    batch = collator(tokenizer, max_length=24)([long, None])
    assert batch.standin is True and batch.inputs.images == {}
    assert batch.data_stats == {"samples": 0, "truncated": 0, "skipped_overflow": 1, "bad": 1}
    assert batch.inputs.input_ids.shape[0] == 1 and labelled(tokenizer, batch.labels[0]) == ".<|end|>"
    teacher = TeacherSide(tokenizer, make_processor(16), num_image_tokens=12)
    batch = collator(tokenizer, max_length=24, teacher=teacher)([long])
    assert batch.standin and batch.teacher_inputs.input_ids.shape[0] == 1
    assert not collator(tokenizer, max_length=24)([rec("ok", prompt="Red?")]).standin
    assert not hasattr(collator(tokenizer, max_length=24, train=False)([long]), "standin")  # generation: no stand-in
    pair = dict(long, chosen="A", rejected="B")
    pair["messages"] = pair["messages"][:1]
    pref = PreferenceCollator(tokenizer, image_processor=make_processor(8), num_image_tokens=4, max_length=24)([pair])
    assert pref.standin and pref.chosen.inputs.input_ids.shape[0] == pref.rejected.inputs.input_ids.shape[0] == 1
    assert not torch.equal(pref.chosen.labels, pref.rejected.labels)
