import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.cache import record_key


def _image(seed=0, size=(5, 4), mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").convert(mode)


def test_key_is_pinned_sha256_hex():
    key = record_key([1, 2, 3], [b"\x00\x01"], [2])
    assert len(key) == 64 and int(key, 16) >= 0
    # Pinned: a change of what is hashed must be deliberate (and bump KEY_VERSION).
    assert key == record_key([1, 2, 3], [b"\x00\x01"], [2])
    assert key == hashlib.sha256(_expected_v1_bytes()).hexdigest()


def _expected_v1_bytes():
    """The version-1 serialization of record_key([1, 2, 3], [b"\\x00\\x01"], [2]), spelled out."""

    def field(tag, payload):
        return tag + len(payload).to_bytes(8, "little") + payload

    out = field(b"K", b"mmkd.cache.key/1")
    out += field(b"S", (1).to_bytes(8, "little"))
    out += field(b"T", b"".join(i.to_bytes(8, "little") for i in (1, 2, 3)))
    out += field(b"P", (2).to_bytes(8, "little"))
    out += field(b"N", (1).to_bytes(8, "little"))
    return out + field(b"b", b"\x00\x01")


def test_same_input_same_key_across_types():
    img = _image()
    base = record_key([5, 6, 7], [img], [1, 2])
    assert record_key(torch.tensor([5, 6, 7]), [img.copy()], torch.tensor([1, 2])) == base
    assert record_key(np.array([5, 6, 7], dtype=np.int32), [_image()], np.array([1, 2])) == base
    # The same image decoded again from the same file bytes gives the same key.
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    again = Image.open(io.BytesIO(buf.getvalue()))
    assert record_key([5, 6, 7], [again], [1, 2]) == base


def test_every_input_changes_the_key():
    img = _image()
    base = record_key([5, 6, 7], [img], [1, 2])
    changed_pixel = img.copy()
    changed_pixel.putpixel((0, 0), tuple((v + 1) % 256 for v in img.getpixel((0, 0))))
    variants = [
        record_key([5, 6, 8], [img], [1, 2]),  # one token id
        record_key([5, 6, 7], [changed_pixel], [1, 2]),  # one pixel
        record_key([5, 6, 7], [img], [1, 3]),  # the stored positions
        record_key([5, 6, 7], [], [1, 2]),  # no image
        record_key([5, 6, 7], [img, img], [1, 2]),  # the image twice
        record_key([5, 6, 7], [img.convert("RGBA")], [1, 2]),  # another mode
        record_key([5, 6, 7], [np.asarray(img)], [1, 2]),  # pixels as an array, not a PIL image
        record_key([[5, 6], [7]], [img], [1, 2]),  # the same ids as two sequences
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_sequences_and_boundaries_are_unambiguous():
    assert record_key([[1, 2], [3]]) != record_key([[1], [2, 3]])
    assert record_key([[1, 2, 3]]) == record_key([1, 2, 3])  # one sequence, however it is passed
    assert record_key([1, 2], [b"ab", b"c"]) != record_key([1, 2], [b"a", b"bc"])
    assert record_key([1, 2], [b"ab"]) != record_key([1, 2], [bytearray(b"ab"), b""])


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="image 0 is a str"):
        record_key([1], ["picture.png"])
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        record_key([1.5, 2.0])
