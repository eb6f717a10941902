"""The import graph follows the layers of docs/architecture.md: each layer imports only the ones below it.

Read from the source (every ``import`` statement, lazy ones inside functions included), so a layer breach fails here
whether or not a test happens to run the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmkd"

# Bottom to top. A module may import modules of its own rank or lower.
RANKS = {
    "mmkd": 0,  # the package itself (its version)
    "mmkd.contract": 0,
    "mmkd.losses": 1,
    "mmkd.models": 2,
    "mmkd.data": 3,
    "mmkd.cache": 3,
    "mmkd.eval": 4,
    "mmkd.assets": 4,
    "mmkd.objectives": 5,
    "mmkd.tasks": 6,
    "mmkd.train": 7,
    "mmkd.report": 8,
    "mmkd.demo": 8,
    "mmkd.cli": 9,
    "mmkd.__main__": 9,
}
# Below the app, only the data module may import Lightning (it is a LightningDataModule).
LIGHTNING_ALLOWED_BELOW_APP = {"mmkd.data.datamodule"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _rank(module: str) -> int:
    best = None
    for prefix, rank in RANKS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    assert best is not None, f"{module}: no layer assigned (add it to RANKS)"
    return best[1]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, imported names)`` of every import statement in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_follow_the_layers(path):
    module = _module_name(path)
    own = _rank(module)
    for line, target, names in _imports(path):
        if target.startswith("mmkd"):
            assert _rank(target) <= own, f"{module}:{line} imports {target} (a higher layer)"
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            same_module = target == module or target == module.rpartition(".")[0] and path.name == "__init__.py"
            assert not private or same_module, f"{module}:{line} imports private names {private} from {target}"
        if target.split(".")[0] in ("lightning", "pytorch_lightning") and own < RANKS["mmkd.train"]:
            assert module in LIGHTNING_ALLOWED_BELOW_APP, f"{module}:{line} imports Lightning below the app layer"


def test_every_package_has_a_layer():
    packages = {_module_name(p) for p in FILES}
    for name in packages:
        _rank(name)
    assert {"mmkd.contract", "mmkd.objectives", "mmkd.tasks", "mmkd.train"} <= packages
