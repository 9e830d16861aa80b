"""Dataset specs → image sources, and the listing of every known name.

:func:`resolve_dataset` reads ``NAME[:SPLIT]`` (a built-in or benchmark set), ``folder:PATH``
and ``npz:PATH``; :func:`list_datasets` says which names are found where. The data root
(``--data-root`` or ``$GRADCLI_DATA_ROOT``) is handled here only. This is the one module that
knows every kind of spec, so the set tables and readers below it stay independent.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from gradcli.data.benchmarks import BENCHMARK_SETS, BenchmarkSet
from gradcli.data.builtin import BUILTIN_SETS, BuiltinSet
from gradcli.data.files import (
    _IMAGE_PATTERN,
    _absolute,
    _class_folder_files,
    _flat_images,
    _require_images,
    _slugify,
    _subfolders,
)
from gradcli.data.sources import ArraySource, FileSource, ImageSource
from gradcli.errors import BadInputError

DATA_ROOT_ENV = "GRADCLI_DATA_ROOT"


def _find_folder(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first candidate folder under ``root``, exact name first, then ignoring case."""
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    by_lower = {name.lower(): root / name for name in _subfolders(root)}
    for name in candidates:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    return None


def _data_root(data_root: str | os.PathLike | None, *, needed_by: str) -> Path:
    value = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV) or None
    if value is None:
        raise BadInputError(
            f"dataset '{needed_by}' is read from a data root: pass --data-root DIR or set "
            f"{DATA_ROOT_ENV}=DIR"
        )
    root = _absolute(value)
    if not root.is_dir():
        raise BadInputError(
            f"data root {root} is not an existing folder; pass --data-root with the folder that "
            f"holds the datasets (or fix {DATA_ROOT_ENV})"
        )
    return root


def _known_names() -> list[str]:
    return [*BUILTIN_SETS, *BENCHMARK_SETS]


def _canonical_split(
    name: str, split: str, splits: Sequence[str], aliases: Mapping[str, str]
) -> str:
    if split in splits:
        return split
    if split in aliases:
        return aliases[split]
    valid = ", ".join([*splits, *aliases])
    raise BadInputError(
        f"dataset '{name}' has no split '{split}'; valid splits: {valid} (write {name}:SPLIT)"
    )


def resolve_dataset(
    spec: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    default_split: str = "test",
) -> ImageSource:
    """Turn a spec (``NAME[:SPLIT]``, ``folder:PATH``, ``npz:PATH``) into an image source.

    Benchmark names are looked up under ``data_root`` (else ``$GRADCLI_DATA_ROOT``); built-in
    names need no data root. ``default_split`` applies when a name comes without ``:SPLIT``.
    A path object stands for ``npz:PATH`` when it names a ``.npz`` file, else ``folder:PATH``.
    """
    if isinstance(spec, os.PathLike):
        path = os.fspath(spec)
        spec = f"npz:{path}" if str(path).lower().endswith(".npz") else f"folder:{path}"
    if not isinstance(spec, str):
        raise BadInputError(
            f"a dataset is a spec such as 'cifar10:test', 'folder:PATH' or 'npz:PATH', "
            f"not {type(spec).__name__}"
        )
    text = spec.strip()
    head, colon, rest = text.partition(":")
    kind = head.strip().lower()
    if kind in ("folder", "npz"):
        if not rest.strip():
            raise BadInputError(f"'{text}' names no path; write {kind}:PATH")
        reader = _resolve_folder if kind == "folder" else _resolve_npz
        return reader(_absolute(rest.strip()))
    split = (rest.strip() if colon else default_split).lower()
    if kind in BUILTIN_SETS:
        return _resolve_builtin(BUILTIN_SETS[kind], split)
    if kind in BENCHMARK_SETS:
        return _resolve_benchmark(BENCHMARK_SETS[kind], split, data_root)
    raise BadInputError(
        f"unknown dataset '{text}'; known names: {', '.join(_known_names())}, "
        "or use folder:PATH (a folder of images) or npz:PATH (arrays x, y)"
    )


def _resolve_builtin(entry: BuiltinSet, split: str) -> ImageSource:
    split = _canonical_split(entry.name, split, entry.splits, entry.aliases)
    folder = entry.locate()
    if folder is None:
        raise BadInputError(
            f"built-in dataset '{entry.name}' is not installed; {entry.install_hint}"
        )
    images, labels = entry.read(folder, split)
    return ArraySource(
        spec=f"{entry.name}:{split}",
        slug=f"{entry.name}-{split}",
        split=split,
        images=images,
        labels=labels,
        class_names=entry.class_names,
    )


def _resolve_benchmark(
    entry: BenchmarkSet, split: str, data_root: str | os.PathLike | None
) -> ImageSource:
    split = _canonical_split(entry.name, split, entry.splits, entry.aliases)
    root = _data_root(data_root, needed_by=entry.name)
    identity = {"spec": f"{entry.name}:{split}", "slug": f"{entry.name}-{split}"}
    for layout in entry.layouts:
        folder = _find_folder(root, layout.folders)
        if folder is not None and layout.probe(folder, split):
            return layout.read(folder, split, **identity)
    expected = "; or ".join(layout.describe(split) for layout in entry.layouts)
    hint = f" ({entry.hint})" if entry.hint else ""
    raise BadInputError(
        f"dataset '{entry.name}:{split}' not found under data root {root}: expected "
        f"{expected}{hint}"
    )


def expected_count(spec: str) -> int | None:
    """The image count of a named set's split in its release (``NAME:SPLIT`` as a source's
    canonical spec), None for folders, archives and unknown names."""
    name, _, split = spec.partition(":")
    entry = BENCHMARK_SETS.get(name) or BUILTIN_SETS.get(name)
    return None if entry is None else entry.expected.get(split)


def count_warning(source: ImageSource) -> str | None:
    """One line when a named set holds another number of images than its release, else None.

    A copy with missing or extra images still runs (it is not refused), but its results are
    not the benchmark's: the line says where the images were found, so the copy can be checked.
    """
    expected = expected_count(source.spec)
    if expected is None or expected == len(source):
        return None
    name = source.spec.partition(":")[0]
    release = getattr(BENCHMARK_SETS.get(name), "source", "") or "its release"
    where = f" in {source.root}" if isinstance(source, FileSource) else ""
    return (
        f"warning: {source.spec} has {len(source):,} images{where}, but {release} has "
        f"{expected:,}; check your copy (gradcli datasets lists expected and found counts)"
    )


def _resolve_folder(path: Path) -> ImageSource:
    if not path.is_dir():
        raise BadInputError(f"folder {path} does not exist; check the path after folder:")
    identity = {"spec": f"folder:{path}", "slug": _slugify(f"folder-{path.name}"), "split": None}
    class_names, class_paths, labels = _class_folder_files(path)
    loose = _flat_images(path)
    if class_paths and loose:
        raise BadInputError(
            f"folder {path} mixes loose images with class sub-folders; move the {len(loose)} "
            "loose images into a class folder (labelled) or the sub-folders out (unlabelled)"
        )
    if class_paths:
        return FileSource(
            root=path,
            relative_paths=class_paths,
            labels=labels,
            class_names=class_names,
            **identity,
        )
    _require_images(len(loose), path, f"{_IMAGE_PATTERN} in it or in class sub-folders")
    return FileSource(root=path, relative_paths=loose, labels=None, class_names=None, **identity)


def _resolve_npz(path: Path) -> ImageSource:
    fix = "save one with np.savez(path, x=uint8_images, y=int_labels)"
    if not path.is_file():
        raise BadInputError(f"archive {path} does not exist; check the path after npz:")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise BadInputError(f"{path} is a single .npy array, not an .npz archive; {fix}")
    if not magic.startswith(b"PK"):
        raise BadInputError(f"{path} is not an .npz archive (not a zip file); {fix}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())
        raise BadInputError(f"cannot read archive {path}: {reason}; {fix}") from exc
    if "x" not in arrays:
        raise BadInputError(f"archive {path} has no array 'x' (it has {sorted(arrays)}); {fix}")
    images = arrays["x"]
    if images.dtype != np.uint8:
        raise BadInputError(
            f"array 'x' in {path} is {images.dtype}, but images must be uint8 in 0..255; "
            "convert with (x * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise BadInputError(
            f"array 'x' in {path} has shape {images.shape}; images must be N×H×W or N×H×W×C "
            "with C 1 or 3 (channels last)"
        )
    if len(images) == 0:
        raise BadInputError(f"array 'x' in {path} holds no images; {fix}")
    labels, class_names = None, None
    if "y" in arrays:
        labels = arrays["y"]
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
            raise BadInputError(
                f"array 'y' in {path} must hold one integer label per image, shape "
                f"({len(images)},), got {labels.dtype} {labels.shape}"
            )
        if labels.min() < 0:
            raise BadInputError(f"array 'y' in {path} has negative labels; use 0..C-1")
        num_classes = int(labels.max()) + 1
        class_names = [str(c) for c in range(num_classes)]
        if "class_names" in arrays:
            class_names = [str(n) for n in arrays["class_names"].reshape(-1)]
            if len(class_names) < num_classes:
                raise BadInputError(
                    f"array 'class_names' in {path} has {len(class_names)} names but labels go "
                    f"up to {num_classes - 1}; give one name per class"
                )
    return ArraySource(
        spec=f"npz:{path}",
        slug=_slugify(f"npz-{path.stem}"),
        split=None,
        images=images,
        labels=labels,
        class_names=class_names,
    )


def _found_count(read: Callable[[], ImageSource]) -> int | None:
    try:
        return len(read())
    except BadInputError:  # unreadable or empty: resolving it names the problem
        return None


def list_datasets(data_root: str | os.PathLike | None, *, count: bool = False) -> list[dict]:
    """One entry per known name: ``{"name", "kind", "benchmark", "layout", "found", "path",
    "splits", "aliases", "found_splits", "expected", "counts", "source"}``.

    Benchmark names are searched under ``data_root`` (else ``$GRADCLI_DATA_ROOT``); without
    either they are listed as not found. ``expected`` maps each split to its release's image
    count; with ``count``, ``counts`` maps each found split to the images found (files are
    listed, archives read: seconds for ImageNet), None where they cannot be read.
    """
    entries = []
    for builtin in BUILTIN_SETS.values():
        folder = builtin.locate()
        counts: dict[str, int | None] = {}
        if count and folder is not None:
            for split in builtin.splits:
                counts[split] = _found_count(functools.partial(_resolve_builtin, builtin, split))
        entries.append(
            {
                "name": builtin.name,
                "kind": "builtin",
                "benchmark": "offline",
                "layout": builtin.layout,
                "found": folder is not None,
                "path": str(folder) if folder is not None else None,
                "splits": list(builtin.splits),
                "aliases": dict(builtin.aliases),
                "found_splits": list(builtin.splits) if folder is not None else [],
                "expected": dict(builtin.expected),
                "counts": counts,
                "source": builtin.layout,
            }
        )
    value = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV) or None
    root = _absolute(value) if value is not None else None
    if root is not None and not root.is_dir():
        root = None
    for bench in BENCHMARK_SETS.values():
        found_path, found_splits, counts = None, [], {}
        choices = ",".join(bench.splits)
        split_choice = f"{{{choices}}}" if len(bench.splits) > 1 else choices
        for split in bench.splits:
            for layout in bench.layouts:
                folder = _find_folder(root, layout.folders) if root is not None else None
                if folder is not None and layout.probe(folder, split):
                    found_path = found_path or folder
                    found_splits.append(split)
                    if count:
                        identity = {"spec": f"{bench.name}:{split}", "slug": bench.name}
                        read = functools.partial(layout.read, folder, split, **identity)
                        counts[split] = _found_count(read)
                    break
        entries.append(
            {
                "name": bench.name,
                "kind": "benchmark",
                "benchmark": ", ".join(bench.benchmarks) or "-",
                "layout": "; or ".join(layout.describe(split_choice) for layout in bench.layouts),
                "found": bool(found_splits),
                "path": str(found_path) if found_path is not None else None,
                "splits": list(bench.splits),
                "aliases": dict(bench.aliases),
                "found_splits": found_splits,
                "expected": dict(bench.expected),
                "counts": counts,
                "source": bench.source,
            }
        )
    return entries
