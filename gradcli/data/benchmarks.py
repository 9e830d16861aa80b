"""The paper's benchmark sets, found under a data root in one of several on-disk layouts.

Readers and probes for the CIFAR python pickles, SVHN ``.mat`` files, ImageFolder class
folders, unlabelled image trees (the OOD collections) and Tiny ImageNet's validation layout,
and the :class:`Layout` / :class:`BenchmarkSet` table :data:`BENCHMARK_SETS` that spec
resolution and listing consult: per name, its benchmark (ImageNet or CIFAR), folders and
the image count of the release the literature uses. ``places`` is the ImageNet benchmark's
10,000-image Places subset (MOS), ``places365`` the CIFAR benchmark's 32x32 one (KNN).
Separate from the built-in sets, which need no data root.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradcli.data.builtin import _DIGIT_NAMES
from gradcli.data.files import (
    _IMAGE_PATTERN,
    _class_folder_files,
    _flat_images,
    _images_under,
    _load_array_pickle,
    _require_images,
)
from gradcli.data.sources import ArraySource, FileSource, ImageSource
from gradcli.errors import BadInputError

_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR100_FILES = {"train": ("train",), "test": ("test",)}


def _cifar_pickle_probe(
    files: Mapping[str, tuple[str, ...]], meta: str
) -> Callable[[Path, str], bool]:
    def probe(folder: Path, split: str) -> bool:
        return split in files and all((folder / n).is_file() for n in (*files[split], meta))

    return probe


def _cifar_pickle_reader(
    files: Mapping[str, tuple[str, ...]], meta: str, label_key: str, names_key: str
) -> Callable[..., ImageSource]:
    """Reader for the python-pickle CIFAR releases (what torchvision downloads)."""

    def read(folder: Path, split: str, **identity: str) -> ImageSource:
        def text_keys(batch: object) -> dict:
            if not isinstance(batch, dict):
                raise BadInputError(f"{folder} holds no CIFAR batches; replace it")
            return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}

        batches = [text_keys(_load_array_pickle(folder / name)) for name in files[split]]
        meta_dict = text_keys(_load_array_pickle(folder / meta))
        try:
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta_dict[names_key]]
        except KeyError as exc:
            raise BadInputError(
                f"{folder} lacks the CIFAR key {exc}; replace it with the python release"
            ) from exc
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return ArraySource(
            images=np.ascontiguousarray(images),
            labels=labels,
            class_names=names,
            split=split,
            **identity,
        )

    return read


def _svhn_probe(folder: Path, split: str) -> bool:
    return (folder / f"{split}_32x32.mat").is_file()


def _read_svhn(folder: Path, split: str, **identity: str) -> ImageSource:
    """torchvision's SVHN files: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    import scipy.io

    path = folder / f"{split}_32x32.mat"
    try:
        content = scipy.io.loadmat(path)
        images = np.ascontiguousarray(np.transpose(content["X"], (3, 0, 1, 2)), dtype=np.uint8)
        labels = content["y"].astype(np.int64).reshape(-1) % 10
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"cannot read {path}: {exc}; replace it with a fresh copy") from exc
    return ArraySource(
        images=images, labels=labels, class_names=_DIGIT_NAMES, split=split, **identity
    )


def _subfolder_probe(template: str) -> Callable[[Path, str], bool]:
    def probe(folder: Path, split: str) -> bool:
        return (folder / template.replace("{split}", split)).is_dir()

    return probe


def _class_folder_reader(template: str) -> Callable[..., ImageSource]:
    """Reader for ``<template>/<class>/**/<image>`` (torchvision ImageFolder)."""

    def read(folder: Path, split: str, **identity: str) -> ImageSource:
        where = folder / template.replace("{split}", split)
        class_names, paths, labels = _class_folder_files(where)
        _require_images(len(paths), where, f"<class>/{_IMAGE_PATTERN}")
        return FileSource(
            root=where,
            relative_paths=paths,
            labels=labels,
            class_names=class_names,
            split=split,
            **identity,
        )

    return read


def _tree_probe(folder: Path, split: str) -> bool:
    return folder.is_dir()


def _read_image_tree(folder: Path, split: str, **identity: str) -> ImageSource:
    """An unlabelled collection: every image anywhere below ``folder``."""
    paths = _images_under(folder)
    _require_images(len(paths), folder, f"images anywhere below it ({_IMAGE_PATTERN})")
    return FileSource(
        root=folder, relative_paths=paths, labels=None, class_names=None, split=split, **identity
    )


def _tiny_val_probe(folder: Path, split: str) -> bool:
    return (
        split == "val"
        and (folder / "val" / "val_annotations.txt").is_file()
        and (folder / "val" / "images").is_dir()
    )


def _read_tiny_val(folder: Path, split: str, **identity: str) -> ImageSource:
    """Tiny ImageNet's original validation layout: ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt`` (file name, wnid, box); classes are the sorted wnids."""
    annotations = folder / "val" / "val_annotations.txt"
    rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
    if any(len(row) < 2 for row in rows):
        raise BadInputError(f"{annotations} is not tab-separated 'file<TAB>wnid...'; replace it")
    by_name = {row[0]: row[1] for row in rows}
    wnids_file = folder / "wnids.txt"
    if wnids_file.is_file():
        class_names = sorted(w.strip() for w in wnids_file.read_text().splitlines() if w.strip())
    else:
        class_names = sorted(set(by_name.values()))
    class_index = {name: i for i, name in enumerate(class_names)}
    names = [n for n in _flat_images(folder / "val" / "images") if n in by_name]
    _require_images(len(names), folder / "val" / "images", "the files val_annotations.txt names")
    unknown = sorted({by_name[n] for n in names} - class_index.keys())
    if unknown:
        raise BadInputError(f"{annotations} names classes missing from {wnids_file}: {unknown[:3]}")
    labels = np.array([class_index[by_name[n]] for n in names], dtype=np.int64)
    return FileSource(
        root=folder / "val",
        relative_paths=[f"images/{n}" for n in names],
        labels=labels,
        class_names=class_names,
        split=split,
        **identity,
    )


@dataclass(frozen=True)
class Layout:
    """One accepted on-disk arrangement of a benchmark set below the data root."""

    folders: tuple[str, ...]  # candidate top folders under the data root, matched ignoring case
    pattern: str  # what a split looks like inside the top folder, "{split}" filled in
    probe: Callable[[Path, str], bool]  # (top folder, split) → is the split's data there?
    read: Callable[..., ImageSource]  # (top folder, split, spec=, slug=) → source

    def describe(self, split: str | None = None) -> str:
        pattern = self.pattern.replace("{split}", split or "{split}")
        return " or ".join(f"{folder}/{pattern}" for folder in self.folders)


IMAGENET = "ImageNet"
CIFAR = "CIFAR"
# The papers whose releases define each OOD collection's images and counts.
_MOS = "Huang & Li, MOS (CVPR 2021) subset"
_ODIN = "Liang et al., ODIN (ICLR 2018) release"
_KNN = "Sun et al., KNN (ICML 2022) release"


@dataclass(frozen=True)
class BenchmarkSet:
    """A benchmark set of the paper: its splits and the layouts accepted, tried in order.

    ``benchmarks`` names the benchmarks the set belongs to (ImageNet, CIFAR), ``expected``
    the image count of each split in the release ``source`` names; a copy with another
    count is warned about, not refused. ``hint`` points at a set that is easily confused
    with this one (said when this one is not found).
    """

    name: str
    splits: tuple[str, ...]
    layouts: tuple[Layout, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    benchmarks: tuple[str, ...] = ()
    expected: Mapping[str, int] = field(default_factory=dict)
    source: str = ""
    hint: str = ""


def _class_folder_layout(folder: str, template: str = "{split}") -> Layout:
    inside = f"{template}/" if template else ""
    return Layout(
        folders=(folder,),
        pattern=f"{inside}<class>/{_IMAGE_PATTERN}",
        probe=_subfolder_probe(template),
        read=_class_folder_reader(template),
    )


def _tree_layout(*folders: str) -> Layout:
    """Unlabelled images anywhere below one folder."""
    return Layout(folders, f"**/{_IMAGE_PATTERN}", _tree_probe, _read_image_tree)


def _ood_set(
    name: str, folder: str, benchmark: str, count: int, source: str, hint: str = ""
) -> BenchmarkSet:
    """An OOD collection: unlabelled images anywhere below one folder (test = all)."""
    return BenchmarkSet(
        name,
        ("test",),
        (_tree_layout(folder),),
        aliases={"all": "test"},
        benchmarks=(benchmark,),
        expected={"test": count},
        source=source,
        hint=hint,
    )


BENCHMARK_SETS: dict[str, BenchmarkSet] = {
    s.name: s
    for s in (
        BenchmarkSet(
            "cifar10",
            ("train", "test"),
            (
                Layout(
                    ("cifar-10-batches-py",),
                    "{data_batch_1..5,test_batch},batches.meta (python release)",
                    _cifar_pickle_probe(_CIFAR10_FILES, "batches.meta"),
                    _cifar_pickle_reader(_CIFAR10_FILES, "batches.meta", "labels", "label_names"),
                ),
                _class_folder_layout("cifar10"),
            ),
            benchmarks=(CIFAR,),
            expected={"train": 50_000, "test": 10_000},
            source="Krizhevsky, CIFAR-10 (2009)",
        ),
        BenchmarkSet(
            "cifar100",
            ("train", "test"),
            (
                Layout(
                    ("cifar-100-python",),
                    "{train,test},meta (python release)",
                    _cifar_pickle_probe(_CIFAR100_FILES, "meta"),
                    _cifar_pickle_reader(
                        _CIFAR100_FILES, "meta", "fine_labels", "fine_label_names"
                    ),
                ),
                _class_folder_layout("cifar100"),
            ),
            benchmarks=(CIFAR,),
            expected={"train": 50_000, "test": 10_000},
            source="Krizhevsky, CIFAR-100 (2009)",
        ),
        BenchmarkSet(
            "svhn",
            ("train", "test"),
            (
                Layout(("svhn",), "{split}_32x32.mat", _svhn_probe, _read_svhn),
                _class_folder_layout("svhn"),
            ),
            benchmarks=(CIFAR,),
            expected={"train": 73_257, "test": 26_032},
            source="Netzer et al., SVHN (2011), cropped digits",
        ),
        BenchmarkSet(
            "textures",
            ("test",),
            (_class_folder_layout("dtd", "images"), _tree_layout("Textures")),
            aliases={"all": "test"},
            benchmarks=(IMAGENET, CIFAR),
            expected={"test": 5_640},
            source="Cimpoi et al., DTD (CVPR 2014), all 47 classes",
        ),
        _ood_set("lsun", "LSUN", CIFAR, 10_000, f"Yu et al., LSUN crop; {_ODIN}"),
        _ood_set("lsun-resize", "LSUN_resize", CIFAR, 10_000, f"Yu et al., LSUN resize; {_ODIN}"),
        _ood_set("isun", "iSUN", CIFAR, 8_925, f"Xu et al., iSUN; {_ODIN}"),
        _ood_set(
            "places365",
            "places365",
            CIFAR,
            10_000,
            f"Zhou et al., Places365, 32x32; {_KNN}",
            hint="the ImageNet benchmark's Places subset is 'places' (folder Places/)",
        ),
        _ood_set(
            "places",
            "Places",
            IMAGENET,
            10_000,
            f"Zhou et al., Places365; {_MOS}",
            hint="the CIFAR benchmark's 32x32 Places365 is 'places365' (folder places365/)",
        ),
        _ood_set("sun", "SUN", IMAGENET, 10_000, f"Xiao et al., SUN; {_MOS}"),
        _ood_set(
            "inaturalist", "iNaturalist", IMAGENET, 10_000, f"Van Horn et al., iNaturalist; {_MOS}"
        ),
        BenchmarkSet(
            "tinyimagenet",
            ("train", "val"),
            (
                Layout(
                    ("tiny-imagenet-200",),
                    "val/images/*.JPEG with val/val_annotations.txt",
                    _tiny_val_probe,
                    _read_tiny_val,
                ),
                _class_folder_layout("tiny-imagenet-200"),
            ),
            aliases={"test": "val"},
            expected={"train": 100_000, "val": 10_000},
            source="Tiny ImageNet (CS231n), 200 classes",
        ),
        BenchmarkSet(
            "imagenet",
            ("train", "val"),
            (_class_folder_layout("imagenet"),),
            aliases={"test": "val"},
            benchmarks=(IMAGENET,),
            expected={"train": 1_281_167, "val": 50_000},
            source="Russakovsky et al., ILSVRC-2012 (ImageNet-1k)",
        ),
    )
}
