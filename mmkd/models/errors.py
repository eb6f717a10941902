"""One-line errors for models that cannot be found, and the checks that raise them before any hub traceback."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# A hub id is "name" or "org/name" made of word characters, dots and dashes; anything else is a path.
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.pth", "*.pt")


class ModelNotFoundError(ValueError):
    """A model id or folder that cannot be loaded; the message is one line saying how to provide a local copy.

    Attributes:
        path: The hub id or folder that failed.
        key: The argument (or recipe key, when a caller adds it) that named it.
    """

    def __init__(self, message: str, *, path: str = "", key: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.key = key


def _how_to_copy(path: str) -> str:
    return (
        f"download it where the hub is reachable (`hf download {path} --local-dir DIR`), "
        "copy DIR here and pass DIR instead"
    )


def is_local(path: str) -> bool:
    """True when ``path`` names a local folder or file (existing, or clearly a path rather than a hub id)."""
    p = os.path.expanduser(path)
    return os.path.exists(p) or p.startswith((".", "/", "~")) or not _HUB_ID.match(path)


def check_folder(
    path: str, *, key: str, what: str, needs: tuple[str, ...] = ("config.json",), weights: bool = True
) -> None:
    """Raise ModelNotFoundError unless the local folder ``path`` holds ``needs`` and (optionally) weights.

    Args:
        path: Local folder.
        key: Argument name used in the message (e.g. ``path``, ``language_model``).
        what: What the folder should hold, for the message ("LLaVA-class model", "causal LM").
        needs: File names that must exist.
        weights: Whether a weights file must exist too.
    """
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"{key}={path!r}: no such folder (expected a {what} folder written by save_pretrained, or a hub id)",
            path=path,
            key=key,
        )
    missing = [n for n in needs if not (folder / n).is_file()]
    if weights and not any(any(folder.glob(p)) for p in _WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if missing:
        raise ModelNotFoundError(
            f"{key}={path!r}: folder is incomplete, missing {', '.join(missing)} "
            f"(expected a complete {what} folder written by save_pretrained)",
            path=path,
            key=key,
        )


def load_or_explain(
    load: Callable[[], T],
    path: str,
    *,
    key: str,
    what: str,
    needs: tuple[str, ...] = ("config.json",),
    weights: bool = True,
    check: bool = True,
) -> T:
    """Run ``load`` and turn hub and file errors into one-line ModelNotFoundError messages.

    Local folders are checked first so a missing file is named rather than reported by the hub client.
    """
    if check and is_local(path):
        check_folder(path, key=key, what=what, needs=needs, weights=weights)
    try:
        return load()
    except (OSError, ValueError) as err:
        # OSError covers the hub client's offline, missing-repo, gated and not-found errors in transformers;
        # ValueError is what it raises for a config that names an unknown architecture.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, ValueError) and not isinstance(err, ModelNotFoundError) and is_local(path):
            raise ModelNotFoundError(f"{key}={path!r}: cannot load the {what} ({first})", path=path, key=key) from err
        if isinstance(err, ModelNotFoundError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "not found or not reachable on the hub"
        raise ModelNotFoundError(
            f"{key}={path!r}: cannot load the {what}: {reason} [{type(err).__name__}]; {_how_to_copy(path)}",
            path=path,
            key=key,
        ) from err
