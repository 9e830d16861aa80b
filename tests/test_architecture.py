"""The package's shape, read from the source with ``ast``: module sizes, no import cycles,
zarr only in the store, a CLI that leaves store paths to the library, imports that resolve."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import gradcli
from gradcli import layout

PACKAGE = Path(gradcli.__file__).resolve().parent
MAX_LINES = 500


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package folder ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside functions, not under
    ``if TYPE_CHECKING:`` (its ``else`` does run), but inside ``try``/``if``/class bodies."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def all_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, wherever it is (functions, TYPE_CHECKING blocks included)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def import_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def imported(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]
) -> set[str]:
    """The modules of ``modules`` that ``node`` imports: ``from p import x`` is module ``p.x``
    when that is a module, else ``p`` itself (a name read from ``p``'s face)."""
    targets = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
        return targets
    base = import_base(node, importer, is_package)
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            targets.add(f"{base}.{alias.name}")
        elif base in modules:
            targets.add(base)
    return targets


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the modules whose import it waits for at import time.

    Importing ``a.b.c`` first runs the packages ``a`` and ``a.b``, so those are edges too,
    except the importer's own enclosing packages: they are already being imported when the
    importer runs. So a package's ``__init__`` re-exporting its submodules, and those
    submodules importing each other by full path, make no cycle; a submodule that reads a
    name from its package's face (``from a.b import Name``) while that face imports the
    submodule does, and is reported.
    """
    files = module_files(root)
    modules = set(files)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        own = {importer.rsplit(".", n)[0] for n in range(importer.count(".") + 1)}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in module_level_imports(tree):
            for target in imported(node, importer, is_package, modules):
                if target != importer:
                    graph[importer].add(target)
                parts = target.split(".")
                for n in range(1, len(parts)):  # the packages that enclose the target
                    needed = ".".join(parts[:n])
                    if needed in modules and needed not in own:
                        graph[importer].add(needed)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]`` by depth-first search, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def cli_files() -> dict[str, Path]:
    """The CLI's modules: ``gradcli/cli.py`` or everything under ``gradcli/cli/``."""
    return {
        name: path
        for name, path in module_files(PACKAGE).items()
        if name == "gradcli.cli" or name.startswith("gradcli.cli.")
    }


# --- the package as it is ------------------------------------------------------------------


def test_no_module_over_500_lines():
    counts = {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, path in module_files(PACKAGE).items()
    }
    assert len(counts) > 20
    over = {name: n for name, n in sorted(counts.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{name} ({n})" for name, n in over.items()
    )


def test_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "gradcli.run" in graph and "gradcli.stages.context" in graph["gradcli.run"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_store_imports_zarr():
    offenders = []
    for name, path in module_files(PACKAGE).items():
        if name == "gradcli.store" or name.startswith("gradcli.store."):
            continue
        for node in all_imports(parse(path)):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] * (node.level == 0)
            )
            if any(n == "zarr" or n.startswith("zarr.") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, "zarr imported outside gradcli/store: " + ", ".join(offenders)


def test_cli_does_not_import_the_store():
    modules = set(module_files(PACKAGE))
    files = cli_files()
    assert files, "no CLI module found"
    offenders = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in all_imports(parse(path)):
            for target in imported(node, name, is_package, modules):
                if target == "gradcli.store" or target.startswith("gradcli.store."):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, "the CLI imports gradcli.store (use Run): " + ", ".join(offenders)


HELP_KEYWORDS = {"help", "short_help", "epilog"}
STORE_PATH = re.compile(
    r"(?<![\w./-])(" + "|".join(sorted(map(re.escape, layout.STAGES), key=len)[::-1]) + r")/"
)


def store_path_literals(tree: ast.Module) -> list[tuple[int, str]]:
    """String constants (f-string parts included) that begin a store path such as
    ``embed/...`` or ``scores/...``; docstrings and ``help=`` texts, which are the commands'
    documentation, are left out."""
    documentation: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            documentation.add(id(body[0].value))
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in HELP_KEYWORDS:
                    documentation.update(id(sub) for sub in ast.walk(keyword.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in documentation
        and STORE_PATH.search(node.value)
    ]


def test_cli_builds_no_store_paths():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {text!r}"
        for path in cli_files().values()
        for line, text in store_path_literals(parse(path))
    ]
    assert not offenders, "store paths built in the CLI (use gradcli.layout via Run): " + (
        ", ".join(offenders)
    )


def test_every_gradcli_import_resolves():
    """Every ``from gradcli... import name`` anywhere in the package (inside functions too)
    names a module or an attribute that exists, so a moved name is caught without running
    the command that imports it lazily."""
    modules = set(module_files(PACKAGE))
    missing = []
    for importer, path in module_files(PACKAGE).items():
        is_package = path.name == "__init__.py"
        for node in all_imports(parse(path)):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = import_base(node, importer, is_package)
            if base != "gradcli" and not base.startswith("gradcli."):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if base not in modules:
                missing.append(f"{where} no module {base}")
                continue
            face = importlib.import_module(base)
            for alias in node.names:
                if (
                    alias.name != "*"
                    and not hasattr(face, alias.name)
                    and f"{base}.{alias.name}" not in modules
                ):
                    missing.append(f"{where} {base} has no {alias.name}")
    assert not missing, "imports that do not resolve: " + ", ".join(missing)


# --- the checks themselves, on small packages made for them --------------------------------


def make_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # A package face re-exporting its submodules, which import each other by full path.
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from pkg.sub.a import A\nfrom .b import B\n",
                "pkg/sub/a.py": "from pkg.sub.b import B\nA = B\n",
                "pkg/sub/b.py": "B = 1\n",
                "pkg/user.py": "from pkg.sub import A\n",
            },
            None,
        ),
        # A submodule reading a name from its own package's face, which imports it.
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from pkg.sub.a import A\nB = 1\n",
                "pkg/sub/a.py": "from pkg.sub import B\nA = B\n",
            },
            ["pkg.sub", "pkg.sub.a", "pkg.sub"],
        ),
        # Importing a submodule from outside runs its package, which imports the importer.
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from pkg import top\n",
                "pkg/sub/a.py": "",
                "pkg/top.py": "import pkg.sub.a\n",
            },
            ["pkg.sub", "pkg.top", "pkg.sub"],
        ),
        # Two modules importing each other at module level, the second relatively.
        (
            {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "from . import a\n"},
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        # The same, with one side deferred into a function or a TYPE_CHECKING block.
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "import pkg.b\n",
                "pkg/b.py": "def f():\n    from pkg import a\n",
            },
            None,
        ),
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from pkg.b import B\n",
                "pkg/b.py": "from typing import TYPE_CHECKING\nB = 1\n"
                "if TYPE_CHECKING:\n    from pkg.a import A\n",
            },
            None,
        ),
        # An import in a try block runs at import time.
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "import pkg.b\n",
                "pkg/b.py": "try:\n    from pkg.a import x\nexcept ImportError:\n    pass\n",
            },
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
    ],
)
def test_cycle_finder(tmp_path, files, expected):
    assert find_cycle(import_graph(make_package(tmp_path, files))) == expected


def test_store_path_literals_are_found_outside_documentation():
    tree = ast.parse(
        '"""Writes scores/<name>."""\n'
        "def show(run, name):\n"
        '    """Reads embed/<name>/grad."""\n'
        '    option(help="into flags/<name>/")\n'
        '    run.store.read(f"embed/{name}/grad")\n'
        '    run.store.read("scores_parts/" + name)\n'
        '    print("no path: --results-dir, embeddings/, a/head/b")\n'
    )
    assert store_path_literals(tree) == [(5, "embed/"), (6, "scores_parts/")]
