"""Dataset specs → image sources → DataLoaders.

A spec names the images a command works on:

- ``NAME[:SPLIT]``: a built-in offline set shipped inside installed packages (``mnist5k``,
  ``digits``, ``texture-patches``, ``fashion``, ``animals``) or one of the paper's benchmark
  sets found under a data root (``cifar10``, ``imagenet``, ``places``, ``places365``, ...),
  each with the image count of its release (:func:`count_warning` says when a copy differs);
- ``folder:PATH``: class sub-folders of images (labelled, classes in sorted order) or a flat
  folder of images (unlabelled);
- ``npz:PATH``: a NumPy archive with ``x`` (uint8 N×H×W or N×H×W×C) and optional ``y``.

Every spec resolves to an :class:`ImageSource` that hands out raw uint8 images; the
:class:`PreprocessedDataset` turns them into normalised model inputs following a
:class:`~gradcli.config.Preprocess`. Sources only hold paths or arrays, so they pickle cheaply
into DataLoader workers.

The package's modules, bottom to top: ``sources`` (image sources, decoding),
``transforms`` (preprocessing, resizing), ``loading`` (preprocessed datasets, DataLoaders),
``files`` (listing, safe unpickling), ``builtin`` (the offline sets), ``benchmarks`` (the
data-root sets and their layouts), ``resolve`` (specs, data root, listing). The names used
elsewhere are re-exported here, so ``gradcli.data.NAME`` keeps working.
"""

from gradcli.data.benchmarks import BENCHMARK_SETS, BenchmarkSet, Layout
from gradcli.data.builtin import (
    BUILTIN_SETS,
    FASHION_DIR,
    BuiltinSet,
    grid_patches,
    read_idx,
    stratified_test_mask,
)
from gradcli.data.files import IMAGE_EXTENSIONS
from gradcli.data.loading import PreprocessedDataset, make_loader
from gradcli.data.resolve import (
    DATA_ROOT_ENV,
    count_warning,
    expected_count,
    list_datasets,
    resolve_dataset,
)
from gradcli.data.sources import (
    ArraySource,
    FileSource,
    ImageSource,
    read_image,
    without_unreadable,
)
from gradcli.data.transforms import preprocess_batch

__all__ = [
    "BENCHMARK_SETS",
    "BUILTIN_SETS",
    "DATA_ROOT_ENV",
    "FASHION_DIR",
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "BenchmarkSet",
    "BuiltinSet",
    "FileSource",
    "ImageSource",
    "Layout",
    "PreprocessedDataset",
    "count_warning",
    "expected_count",
    "grid_patches",
    "list_datasets",
    "make_loader",
    "preprocess_batch",
    "read_idx",
    "read_image",
    "resolve_dataset",
    "stratified_test_mask",
    "without_unreadable",
]
