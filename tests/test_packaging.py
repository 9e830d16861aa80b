"""Every third-party module that gradcli imports comes from a dependency pyproject.toml declares."""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Import names whose distribution is named otherwise, for when the package is not installed here.
KNOWN_DISTRIBUTIONS = {
    "PIL": {"pillow"},
    "sklearn": {"scikit-learn"},
    "skimage": {"scikit-image"},
    "faiss": {"faiss-cpu", "faiss-gpu"},
}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(specs):
        return {_normalised(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in specs}

    optional = [
        spec for extra in project.get("optional-dependencies", {}).values() for spec in extra
    ]
    return names(project["dependencies"]), names(optional)


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module name -> the gradcli files that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "gradcli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top != "gradcli" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()


def _owners(module: str) -> set[str]:
    installed = _installed().get(module, [])
    return {_normalised(d) for d in installed} | KNOWN_DISTRIBUTIONS.get(
        module, {_normalised(module)}
    )


def test_every_imported_package_is_declared():
    required, optional = _declared()
    undeclared = {
        module: files
        for module, files in _third_party_imports().items()
        if not _owners(module) & (required | optional)
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_scan_sees_known_imports():
    imports = _third_party_imports()
    for module in ("torch", "typer", "zarr", "faiss", "numpy"):
        assert module in imports
    assert "click" not in imports, "typer 0.29 no longer brings click; use typer's own exceptions"


def test_packages_for_optional_features_are_imported_lazily():
    """matplotlib and pyarrow are extras: a module-level import would break the base install."""
    _, optional = _declared()
    required, _ = _declared()
    for path in sorted((ROOT / "gradcli").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level only
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            for module in modules:
                owners = _owners(module.split(".")[0])
                assert not (owners & optional and not owners & required), (
                    f"{path.name} imports the optional {module} at module level"
                )
