"""Each top-level package's ``__all__`` is true: every name in it exists, every public import is in it.

A package whose re-exports load on first use (``models``, ``store``, ``workers``) lists them under
``if TYPE_CHECKING:`` for type checkers and in ``_SOURCES`` for the interpreter; both must agree.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [
    name
    for name in ("config", "models", "store", "workers", "api", "agents", "simulator")
    if (ROOT / name / "__init__.py").is_file() and "__all__" in (ROOT / name / "__init__.py").read_text()
]
LAZY_PACKAGES = [name for name in PACKAGES if "_SOURCES" in (ROOT / name / "__init__.py").read_text()]


def imported_public_names(package: str) -> dict[str, str]:
    """Each public name the package's ``__init__`` imports (for type checkers, if lazily) -> its module."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    statements: list[ast.stmt] = []
    for node in tree.body:
        lazy = isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        statements.extend(node.body if isinstance(node, ast.If) and lazy else [node])
    names: dict[str, str] = {}
    for node in statements:
        if isinstance(node, ast.ImportFrom) and node.module not in ("__future__", "typing"):
            names.update({alias.asname or alias.name: node.module or "" for alias in node.names})
        elif isinstance(node, ast.Import):
            names.update({(alias.asname or alias.name).split(".")[0]: alias.name for alias in node.names})
    return {name: module for name, module in names.items() if not name.startswith("_")}


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_complete_and_defined(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{package}.__all__ has duplicates"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names undefined: {missing}"
    unlisted = sorted(set(imported_public_names(package)) - set(exported))
    assert not unlisted, f"{package}/__init__.py imports public names missing from __all__: {unlisted}"


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_a_lazy_package_loads_each_name_from_where_type_checkers_see_it(package: str) -> None:
    module = importlib.import_module(package)
    assert imported_public_names(package) == module._SOURCES
    assert set(module._SOURCES) == set(module.__all__)


def test_the_model_layer_is_among_the_packages() -> None:
    assert "models" in PACKAGES
    assert {"models", "store", "workers"} <= set(LAZY_PACKAGES)
