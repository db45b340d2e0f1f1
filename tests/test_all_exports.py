"""Each top-level package's ``__all__`` is true: every name in it exists, every public import is in it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [
    name
    for name in ("models", "store", "workers", "api", "agents", "simulator")
    if (ROOT / name / "__init__.py").is_file() and "__all__" in (ROOT / name / "__init__.py").read_text()
]


def imported_public_names(package: str) -> set[str]:
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_complete_and_defined(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{package}.__all__ has duplicates"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names undefined: {missing}"
    unlisted = sorted(imported_public_names(package) - set(exported))
    assert not unlisted, f"{package}/__init__.py imports public names missing from __all__: {unlisted}"


def test_the_model_layer_is_among_the_packages() -> None:
    assert "models" in PACKAGES
