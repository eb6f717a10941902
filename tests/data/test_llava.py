import pytest
from conftest import write_image, write_json

from mmkd.data.llava import CaptionPairs, LlavaConversations, PreferencePairs, parse_options


def _conv(rid="1", image="a.png", human="<image>\nWhat is it?", gpt="A red square."):
    rec = {"id": rid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
    if image is not None:
        rec["image"] = image
    return rec


def test_conversations_reader(tmp_path) -> None:
    write_image(tmp_path / "img/a.png")
    multi = _conv("2", None, "Hi", "Hello")
    multi["conversations"] += [{"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Yes."}]
    path = write_json(tmp_path / "data.json", [_conv(), multi])
    ds = LlavaConversations(path, tmp_path / "img")
    rec = ds[0]
    assert rec["id"] == "1" and len(rec["images"]) == 1 and rec["images"][0].size == (12, 12)
    assert rec["messages"] == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A red square."},
    ]
    assert [m["role"] for m in ds[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert ds[1]["images"] == []


def test_conversations_jsonl(tmp_path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text('{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value":'
                                      ' "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}\n')  # fmt: skip
    assert LlavaConversations(tmp_path / "d.jsonl", tmp_path)[0]["id"] == "x"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"id": "b", "conversations": []}, r"record 'b': 'conversations' must be a non-empty list"),
        ({"id": "b", "conversations": [{"from": "bot", "value": "x"}]}, r"record 'b': conversations\[0\] must be"),
        ({"id": "b", "conversations": [{"from": "human", "value": "x"}]}, r"'b': 'conversations' has no assistant"),
        (_conv("b", image=None), r"record 'b': 1 '<image>' placeholders in the prompt turns but 0 images"),
        (_conv("b", image=7), r"record 'b': 'image' must be a path"),
        ("not a record", r"record #1 must be an object"),
    ],
)
def test_malformed_records(tmp_path, bad, message) -> None:
    write_image(tmp_path / "a.png")
    path = write_json(tmp_path / "d.json", [_conv(), bad])
    with pytest.raises(ValueError, match=message):
        LlavaConversations(path, tmp_path)
    ds = LlavaConversations(path, tmp_path, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1


def test_missing_image_and_invalid_json(tmp_path) -> None:
    path = write_json(tmp_path / "d.json", [_conv()])
    with pytest.raises(FileNotFoundError, match=r"d.json: record '1': image .*a.png not found"):
        LlavaConversations(path, tmp_path)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON"):
        LlavaConversations(tmp_path / "broken.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothere.json: file not found"):
        LlavaConversations(tmp_path / "nothere.json", tmp_path)


def test_caption_pairs_both_shapes(tmp_path) -> None:
    write_image(tmp_path / "a.png")
    path = write_json(tmp_path / "c.json", [_conv(gpt="A cat."), {"id": "p", "image": "a.png", "caption": "A dog."}])
    ds = CaptionPairs(path, tmp_path)
    assert ds[0]["messages"][1]["content"] == "A cat."
    assert ds[1]["messages"] == [
        {"role": "user", "content": "<image>\nGive a brief description of the image."},
        {"role": "assistant", "content": "A dog."},
    ]
    bad = write_json(tmp_path / "b.json", [_conv(image=None, human="no image")])
    with pytest.raises(ValueError, match="record '1': a caption pair needs exactly one image, got 0"):
        CaptionPairs(bad, tmp_path)


def test_preference_pairs(tmp_path) -> None:
    write_image(tmp_path / "a.png")
    rows = [
        {"idx": 5, "image": "a.png", "question": "What is it?", "chosen": "A square.", "rejected": "A circle."},
        {"id": "t", "question": "2+2?", "chosen": "4", "rejected": "5"},
        {"id": "bad", "question": "Q", "chosen": "same", "rejected": "same"},
    ]
    path = write_json(tmp_path / "p.json", rows)
    with pytest.raises(ValueError, match="record 'bad': 'chosen' and 'rejected' are identical"):
        PreferencePairs(path, tmp_path)
    ds = PreferencePairs(path, tmp_path, skip_bad=True)
    assert len(ds) == 2 and ds.summary()["skipped_bad"] == 1
    rec = ds[0]
    assert rec["id"] == "5" and rec["messages"] == [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert (rec["chosen"], rec["rejected"]) == ("A square.", "A circle.") and len(rec["images"]) == 1


def test_parse_options() -> None:
    assert parse_options("Q?\nA. one\nB. two\nAnswer with the option's letter from the given choices directly.") == [
        "one",
        "two",
    ]
    assert parse_options("Context: A. is a letter\nQ?\nA. x\nB. y\nC. z") == ["x", "y", "z"]
    assert parse_options("no options") == []
