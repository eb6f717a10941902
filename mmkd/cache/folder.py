"""The layout of a cache folder, in one place, and the reading of its header.

Layout::

    header.json                                   the CacheSpec (the same for every rank; written once, atomically)
    shard-r{rank:05d}-{seq:06d}.safetensors       complete shards (their tensors: mmkd.cache.shard)
    .shard-r{rank:05d}-{seq:06d}.safetensors.tmp  a shard being written (never read; removed when its rank resumes)
    index.safetensors                             optional merged key index, written by finalize()
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mmkd.cache.errors import CacheError
from mmkd.cache.spec import CacheSpec

__all__ = [
    "HEADER",
    "INDEX",
    "INDEX_FORMAT",
    "key_bytes",
    "list_shards",
    "read_header",
    "shard_name",
    "temp_name",
    "temp_shards",
]

HEADER = "header.json"
INDEX = "index.safetensors"
INDEX_FORMAT = "mmkd-cache-index/1"
_SHARD_RE = re.compile(r"^shard-r(\d{5})-(\d{6})\.safetensors$")


def key_bytes(key: str) -> bytes:
    """The 32 bytes of a record key (64 hex characters, as :func:`mmkd.cache.record_key` returns)."""
    if not isinstance(key, str) or len(key) != 64:
        raise CacheError(f"record key {key!r}: expected 64 hex characters (mmkd.cache.record_key)")
    try:
        return bytes.fromhex(key)
    except ValueError:
        raise CacheError(f"record key {key!r}: expected 64 hex characters (mmkd.cache.record_key)") from None


def read_header(folder: Path) -> CacheSpec | None:
    """The spec in ``folder/header.json``, None when the folder has no header yet."""
    path = folder / HEADER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"{path}: cannot read the cache header ({e.strerror})") from None
    try:
        return CacheSpec.from_json(json.loads(text), where=str(path))
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not a JSON cache header ({e.msg} at line {e.lineno})") from None
    except ValueError as e:
        raise CacheError(str(e)) from None


def shard_name(rank: int, seq: int) -> str:
    """``shard-r00003-000012.safetensors``: rank 3's 13th shard (ranks never write each other's names)."""
    return f"shard-r{rank:05d}-{seq:06d}.safetensors"


def temp_name(rank: int, seq: int) -> str:
    """The hidden name a shard is written under before it is renamed to :func:`shard_name`."""
    return f".{shard_name(rank, seq)}.tmp"


def temp_shards(folder: Path, rank: int | None = None) -> list[Path]:
    """Temporary shard files of one rank (or of all): shards being written, or left by a killed writer."""
    pattern = f".shard-r{rank:05d}-*.safetensors.tmp" if rank is not None else ".shard-r*-*.safetensors.tmp"
    return sorted(folder.glob(pattern))


def list_shards(folder: Path) -> list[tuple[int, int, Path]]:
    """Complete shards of a folder as ``(rank, seq, path)``, sorted; temporary files are not shards."""
    out = []
    for path in folder.iterdir():
        m = _SHARD_RE.match(path.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(out)
