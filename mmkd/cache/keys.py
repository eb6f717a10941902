"""Record keys: a sha256 of exactly what the teacher saw, so a cache entry can be joined with its sample.

What is hashed (version 1), in this order, each field as ``tag (1 byte) + length (8 bytes, little endian) +
payload``, so that no two different inputs serialize to the same bytes:

1. the domain string ``b"mmkd.cache.key/1"``;
2. ``S``: the number of token sequences (uint64 LE), then per sequence ``T``: its token ids as int64 LE (the
   teacher's full input sequence: prompt + answer, with each image placeholder expanded exactly as the teacher
   saw it; preference records pass the chosen and the rejected sequence, in that order);
3. ``P``: the stored positions as int64 LE (empty when the record stores no top-k);
4. ``N``: the number of images (uint64 LE), then one field per image:

   * a PIL image (anything with ``mode``, ``size`` and ``tobytes()``): tag ``p``, payload = the mode in ASCII,
     a zero byte, width and height (uint64 LE each), then ``image.tobytes()`` (the decoded pixels). The same
     file decoded by the same Pillow version therefore always gives the same key, whatever its path or name;
     converting the image (``.convert("RGB")``) or resizing it changes the key, so hash the image the teacher's
     processor received;
   * raw bytes (``bytes``, ``bytearray``, ``memoryview``), e.g. the image file as read from disk: tag ``b``,
     the bytes as given;
   * an array (numpy or torch, e.g. the processed ``pixel_values``): tag ``a``, payload = the numpy dtype string
     (``"<f4"``), a zero byte, the number of dimensions and each dimension (uint64 LE), then the C-order bytes.

   The three kinds hash differently on purpose (the file bytes of an image are not its pixels): pick one kind
   per dataset and keep it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["KEY_VERSION", "record_key"]

KEY_VERSION = 1
_DOMAIN = b"mmkd.cache.key/1"


def record_key(
    tokens: Sequence[int] | Sequence[Sequence[int]] | np.ndarray | torch.Tensor,
    images: Sequence[Any] = (),
    positions: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> str:
    """The cache key of one record: sha256 hex of its token sequence(s), stored positions and images.

    Args:
        tokens: The teacher's input token ids: one sequence ``(T,)`` or several (a list of sequences or a
            ``(S, T)`` array), e.g. ``[prompt + chosen, prompt + rejected]`` for a preference record.
        images: The images the teacher saw, in order: PIL images, raw bytes or arrays (see the module docstring).
        positions: The positions whose top-k the record stores ``(n,)``; None or empty when it stores none.

    Returns:
        64 lowercase hex characters.
    """
    h = hashlib.sha256()
    _field(h, b"K", _DOMAIN)
    sequences = _sequences(tokens)
    _field(h, b"S", struct.pack("<Q", len(sequences)))
    for seq in sequences:
        _field(h, b"T", seq.tobytes())
    _field(h, b"P", _int64(positions if positions is not None else []).tobytes())
    images = list(images)
    _field(h, b"N", struct.pack("<Q", len(images)))
    for i, image in enumerate(images):
        tag, payload = _image_bytes(image, i)
        _field(h, tag, payload)
    return h.hexdigest()


def _field(h: Any, tag: bytes, payload: bytes | memoryview) -> None:
    h.update(tag)
    h.update(struct.pack("<Q", len(payload)))
    h.update(payload)


def _int64(values: Any) -> np.ndarray:
    """Little-endian int64 copy of a 1-D integer sequence (a float or 2-D input is a caller bug: say so)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype="<i8")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"record_key: expected a 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype("<i8")


def _sequences(tokens: Any) -> list[np.ndarray]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        if tokens.ndim == 2:
            return [_int64(row) for row in tokens]
        return [_int64(tokens)]
    tokens = list(tokens)
    # A list whose first item is itself a sequence is a list of sequences (a flat list of ints is one sequence).
    if tokens and not isinstance(tokens[0], int | np.integer):
        return [_int64(seq) for seq in tokens]
    return [_int64(tokens)]


def _image_bytes(image: Any, index: int) -> tuple[bytes, bytes | memoryview]:
    if isinstance(image, bytes | bytearray | memoryview):
        return b"b", bytes(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().contiguous().numpy()
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        head = arr.dtype.str.encode() + b"\0" + struct.pack(f"<Q{arr.ndim}Q", arr.ndim, *arr.shape)
        return b"a", head + arr.tobytes()
    if hasattr(image, "mode") and hasattr(image, "size") and hasattr(image, "tobytes"):
        width, height = image.size
        return b"p", image.mode.encode("ascii") + b"\0" + struct.pack("<QQ", width, height) + image.tobytes()
    raise ValueError(f"record_key: image {index} is a {type(image).__name__}; expected a PIL image, bytes or an array")
