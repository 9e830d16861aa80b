"""Are two gradcli versions' demo runs the same, bit for bit?

Runs the built-in offline benchmark (``gradcli demo``, the README's main command) with this
working tree and with another revision of the repository (checked out into a temporary git
worktree), each in its own process and its own fresh store, then compares the two stores:
every array's shape, dtype and bytes, every group's and array's attributes, results.json and
results.csv. Values that only say when or by which version a store was written (``created``,
``gradcli_version``, timings) are left out of the comparison; the script lists the keys it
skipped, and the store's own path is written as ``<store>`` before comparing.

Both runs train the demo CNN from the same seed, so the weights file is compared too.

Run from the repository root (about a minute on 2 cores)::

    python benchmarks/same_results.py --against c58ee38
    python benchmarks/same_results.py --stores artifacts/a artifacts/b   # compare two stores

Exit status 0 when the stores are equal, 1 with a list of differences otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
VOLATILE_KEYS = frozenset({"created", "gradcli_version", "seconds", "elapsed", "wall_seconds"})


def run_demo(tree: Path, store: Path) -> None:
    """``gradcli demo`` of the package in ``tree`` into ``store``, in a child process (as the
    README runs it: results.json and results.csv are written into the store)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "GRADCLI_PROGRESS_INTERVAL": "3600"}
    command = [sys.executable, "-m", "gradcli", "demo", "--store", str(store), "--quiet"]
    subprocess.run(command, check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)


def _strip(value, skipped: set[str], store: Path):
    """``value`` without volatile keys, the store's own path written as ``<store>``."""
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            if key in VOLATILE_KEYS:
                skipped.add(key)
                continue
            kept[key] = _strip(item, skipped, store)
        return kept
    if isinstance(value, list):
        return [_strip(item, skipped, store) for item in value]
    if isinstance(value, str):
        return value.replace(str(store), "<store>")
    return value


def _entries(store: Path) -> dict[str, tuple[str, object]]:
    """path -> ('group', attrs) or ('array', (shape, dtype, attrs, sha256 of bytes))."""
    with warnings.catch_warnings():  # the weights file beside the arrays is not zarr's
        warnings.simplefilter("ignore")
        root = zarr.open_group(str(store), mode="r")
        return _walk(root)


def _walk(root) -> dict[str, tuple[str, object]]:
    found: dict[str, tuple[str, object]] = {"/": ("group", dict(root.attrs))}

    def visit(group, prefix: str) -> None:
        for name, member in group.members():
            path = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                found[path] = ("group", dict(member.attrs))
                visit(member, path + "/")
            else:
                data = np.ascontiguousarray(member[...])
                digest = hashlib.sha256(data.tobytes()).hexdigest()
                found[path] = (
                    "array",
                    (member.shape, str(member.dtype), dict(member.attrs), digest),
                )

    visit(root, "")
    return found


def compare_stores(a: Path, b: Path) -> tuple[list[str], set[str]]:
    """Differences between two stores (empty when equal) and the volatile keys left out."""
    skipped: set[str] = set()
    left, right = _entries(a), _entries(b)
    differences = [f"only in {a}: {p}" for p in sorted(left.keys() - right.keys())]
    differences += [f"only in {b}: {p}" for p in sorted(right.keys() - left.keys())]
    for path in sorted(left.keys() & right.keys()):
        kind_a, value_a = left[path]
        kind_b, value_b = right[path]
        if kind_a != kind_b:
            differences.append(f"{path}: {kind_a} vs {kind_b}")
        elif kind_a == "group":
            if _strip(value_a, skipped, a) != _strip(value_b, skipped, b):
                differences.append(f"{path}: group attributes differ")
        else:
            shape_a, dtype_a, attrs_a, digest_a = value_a
            shape_b, dtype_b, attrs_b, digest_b = value_b
            if (shape_a, dtype_a) != (shape_b, dtype_b):
                differences.append(f"{path}: {shape_a} {dtype_a} vs {shape_b} {dtype_b}")
            elif digest_a != digest_b:
                differences.append(f"{path}: bytes differ")
            if _strip(attrs_a, skipped, a) != _strip(attrs_b, skipped, b):
                differences.append(f"{path}: array attributes differ")
    for name in ("results.json", "results.csv", "mnist_cnn.pt"):
        file_a, file_b = a / name, b / name
        if file_a.exists() != file_b.exists():
            differences.append(f"{name}: present in only one store")
        elif file_a.exists():
            if name.endswith(".json"):  # the store's own path may appear in it
                same = _strip(json.loads(file_a.read_text()), skipped, a) == _strip(
                    json.loads(file_b.read_text()), skipped, b
                )
            else:
                same = file_a.read_bytes() == file_b.read_bytes()
            if not same:
                differences.append(f"{name}: differs")
    return differences, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--against", help="git revision to compare this working tree with")
    group.add_argument("--stores", nargs=2, type=Path, help="compare two existing stores")
    args = parser.parse_args()
    if args.stores:
        a, b = args.stores
    else:
        scratch = Path(tempfile.mkdtemp(prefix="gradcli-same-"))
        other = scratch / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(other), args.against],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        try:
            a, b = scratch / f"store-{args.against}", scratch / "store-working-tree"
            print(f"demo with {args.against} -> {a}", flush=True)
            run_demo(other, a)
            print(f"demo with the working tree -> {b}", flush=True)
            run_demo(ROOT, b)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False
            )
    differences, skipped = compare_stores(a, b)
    arrays = sum(kind == "array" for kind, _ in _entries(a).values())
    if skipped:
        print(f"left out of the comparison (when/by which version written): {sorted(skipped)}")
    if differences:
        print(f"{len(differences)} differences between {a} and {b}:")
        for line in differences:
            print(f"  {line}")
        return 1
    print(f"same: {arrays} arrays, their attributes, results.json and results.csv: bitwise equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
