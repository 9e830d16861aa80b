"""Tests for dataset specs, image sources, preprocessing and loaders."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradcli import data
from gradcli.config import Preprocess
from gradcli.data import (
    DATA_ROOT_ENV,
    list_datasets,
    make_loader,
    preprocess_batch,
    resolve_dataset,
)
from gradcli.errors import BadInputError

LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(autouse=True)
def _no_data_root_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)


def write_image(path: Path, array: np.ndarray) -> Path:
    """Save a uint8 (H, W) grey or (H, W, 3) colour array as an image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def random_image(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def builtin_missing(name: str) -> bool:
    return data.BUILTIN_SETS[name].locate() is None


# ---------------------------------------------------------------- built-in offline sets


def test_mnist5k_is_a_stratified_reproducible_split_of_the_csv() -> None:
    train = resolve_dataset("mnist5k:train")
    test = resolve_dataset("mnist5k")  # default split: test
    assert (train.spec, train.slug, test.spec, test.slug) == (
        "mnist5k:train",
        "mnist5k-train",
        "mnist5k:test",
        "mnist5k-test",
    )
    assert (len(train), len(test)) == (4000, 1000)
    assert train.load(0)[0].shape == (28, 28, 1) and train.num_classes == 10
    np.testing.assert_array_equal(np.bincount(train.labels()), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels()), [100] * 10)

    # Together the two splits are exactly the rows of the file, each used once.
    csv_file = data.BUILTIN_SETS["mnist5k"].locate() / "mnist_5k.csv.gz"
    with gzip.open(csv_file, "rt") as stream:
        rows = [np.array(line.split(","), dtype=np.uint8) for line in stream]
    expected = Counter(row.tobytes() for row in rows)  # 784 pixels, then the label
    ours = Counter()
    for source in (train, test):
        images, labels = source.load_many(range(len(source)))
        ours.update(
            im.reshape(-1).tobytes() + bytes([int(lab)])
            for im, lab in zip(images, labels, strict=True)
        )
    assert ours == expected

    again = resolve_dataset("mnist5k:test")
    np.testing.assert_array_equal(again.load_many(range(1000))[0], test.load_many(range(1000))[0])
    assert again.fingerprint() == test.fingerprint() != train.fingerprint()


def test_stratified_mask_keeps_class_proportions_and_depends_on_seed() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    mask = data.stratified_test_mask(labels, 10, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[mask]), [5, 3, 2])
    np.testing.assert_array_equal(mask, data.stratified_test_mask(labels, 10, seed=0))
    assert not np.array_equal(mask, data.stratified_test_mask(labels, 10, seed=1))


def test_digits_match_scikit_learn_scaled_to_bytes() -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    source = resolve_dataset("digits:all")
    assert source.spec == "digits:test" and len(source) == 1797
    images, labels = source.load_many(range(len(source)))
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], np.rint(reference.images * 255 / 16))
    np.testing.assert_array_equal(labels, reference.target)
    np.testing.assert_array_equal(source.labels(), reference.target)


def test_texture_patches_are_grid_crops_of_the_three_photos() -> None:
    source = resolve_dataset("texture-patches")
    assert len(source) == 972 and source.class_names == ["brick", "grass", "gravel"]
    np.testing.assert_array_equal(np.bincount(source.labels()), [324, 324, 324])
    folder = data.BUILTIN_SETS["texture-patches"].locate()
    gravel = np.asarray(Image.open(folder / "gravel.png").convert("L"))
    # 512 px = 18 patches of 28 px + 8 px margin, 4 px on each side; patch (row 1, col 2):
    image, label = source.load(2 * 324 + 18 + 2)
    assert label == 2
    np.testing.assert_array_equal(image[..., 0], gravel[4 + 28 : 4 + 56, 4 + 56 : 4 + 84])


@pytest.mark.skipif(builtin_missing("fashion"), reason="Debian's dataset-fashion-mnist is absent")
def test_fashion_reads_both_idx_splits() -> None:
    test = resolve_dataset("fashion")
    assert len(test) == 10_000 and test.num_classes == 10
    np.testing.assert_array_equal(np.bincount(test.labels()), [1000] * 10)
    # Independent parse: a 16-byte header (magic, count, rows, cols), then the pixels.
    with gzip.open(data.FASHION_DIR / "t10k-images-idx3-ubyte.gz") as stream:
        raw = stream.read(16 + 2 * 784)
    np.testing.assert_array_equal(test.load(1)[0].reshape(-1), np.frombuffer(raw[16 + 784 :], "u1"))
    train = resolve_dataset("fashion:train")
    assert len(train) == 60_000 and train.load(0)[0].shape == (28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels()), [6000] * 10)


@pytest.mark.skipif(builtin_missing("animals"), reason="the animal_mnist wheel is not installed")
def test_animals_match_the_pickled_arrays_without_importing_the_package() -> None:
    source = resolve_dataset("animals:all")
    assert "animal_mnist" not in sys.modules
    assert source.spec == "animals:test" and len(source) == 10_000
    assert source.class_names[0] == "Bear" and source.num_classes == 10
    folder = data.BUILTIN_SETS["animals"].locate()
    with gzip.open(folder / "animal_label_version_3.gz") as stream:
        reference_labels = pickle.load(stream)  # the installed file, trusted here as reference
    with gzip.open(folder / "animal_data_version_3.gz") as stream:
        reference_images = pickle.load(stream)
    np.testing.assert_array_equal(source.labels(), reference_labels)
    images, _ = source.load_many([0, 5000, 9999])
    np.testing.assert_array_equal(images[..., 0], reference_images[[0, 5000, 9999]])


# ---------------------------------------------------------------- folders and archives


def test_labelled_folder_with_mixed_sizes_and_grey_and_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dog = write_image(tmp_path / "dog" / "b.png", random_image(rng, (20, 30)))
    write_image(tmp_path / "dog" / "a.png", random_image(rng, (12, 12, 3)))
    write_image(tmp_path / "cat" / "nested" / "z.png", random_image(rng, (9, 17, 3)))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    source = resolve_dataset(f"folder:{tmp_path}")
    assert source.spec == f"folder:{tmp_path}" and source.slug == f"folder-{tmp_path.name}"
    assert source.class_names == ["cat", "dog"] and source.has_labels
    assert [source.item_id(i) for i in range(len(source))] == [
        str(tmp_path / "cat" / "nested" / "z.png"),
        str(tmp_path / "dog" / "a.png"),
        str(dog),
    ]
    np.testing.assert_array_equal(source.labels(), [0, 1, 1])
    grey, label = source.load(2)
    assert grey.shape == (20, 30, 1) and label == 1
    np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.open(dog)))
    assert source.load(1)[0].shape == (12, 12, 3)

    preprocess = Preprocess((8, 8), 3, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    x, y = next(iter(make_loader(source, preprocess, batch_size=3)))
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 1]
    one = preprocess_batch(torch.from_numpy(grey)[None], preprocess)[0]
    torch.testing.assert_close(x[2], one)


def test_relative_folder_path_becomes_absolute(tmp_path: Path, monkeypatch) -> None:
    write_image(tmp_path / "imgs" / "a.png", np.zeros((4, 4), np.uint8))
    monkeypatch.chdir(tmp_path)
    source = resolve_dataset("folder:imgs")
    assert source.spec == f"folder:{tmp_path / 'imgs'}" and source.slug == "folder-imgs"


def test_flat_folder_is_unlabelled_and_ignores_folders_without_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("b.JPG", "a.png", "c.webp"):
        write_image(tmp_path / name, random_image(rng, (6, 5, 3)))
    (tmp_path / "empty_subfolder").mkdir()
    (tmp_path / "readme.md").write_text("hello")
    source = resolve_dataset(f"folder:{tmp_path}")
    assert not source.has_labels and source.class_names is None and source.num_classes is None
    assert [Path(source.item_id(i)).name for i in range(3)] == ["a.png", "b.JPG", "c.webp"]
    np.testing.assert_array_equal(source.labels(), [-1, -1, -1])
    assert source.load(0)[1] == -1


def test_folder_mixing_loose_images_and_class_folders_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "cls" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(BadInputError, match="mixes loose images with class sub-folders"):
        resolve_dataset(f"folder:{tmp_path}")


def test_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    with pytest.raises(BadInputError, match="no images found in"):
        resolve_dataset(f"folder:{tmp_path}")
    with pytest.raises(BadInputError, match="does not exist"):
        resolve_dataset(f"folder:{tmp_path / 'nope'}")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n this is not really a png"])
def test_unreadable_image_names_the_file_and_the_fix(tmp_path: Path, content: bytes) -> None:
    write_image(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad.png").write_bytes(content)
    source = resolve_dataset(f"folder:{tmp_path}")
    with pytest.raises(
        BadInputError, match=r"cannot read image .*bad\.png: .*; remove or replace it"
    ) as err:
        source.load(0)  # bad.png sorts first
    assert "\n" not in str(err.value)
    source.load(1)


def test_truncated_image_is_an_error(tmp_path: Path) -> None:
    path = write_image(tmp_path / "t.png", random_image(np.random.default_rng(2), (64, 64, 3)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadInputError, match="cannot read image"):
        resolve_dataset(f"folder:{tmp_path}").load(0)


def test_image_modes_become_grey_or_rgb(tmp_path: Path) -> None:
    rgba = np.random.default_rng(3).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.png")
    wide = (np.arange(30, dtype=np.uint16) * 2000).reshape(5, 6)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(data.read_image(tmp_path / "rgba.png"), rgba[..., :3])
    assert data.read_image(tmp_path / "palette.png").shape == (5, 6, 3)
    grey16 = data.read_image(tmp_path / "grey16.png")
    np.testing.assert_array_equal(grey16[..., 0], np.rint(wide / 257.0))


def test_npz_archive_with_and_without_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images = random_image(rng, (6, 5, 7))
    np.savez(tmp_path / "grey.npz", x=images, y=np.array([0, 2, 1, 2, 0, 1]))
    source = resolve_dataset(f"npz:{tmp_path / 'grey.npz'}")
    assert (source.spec, source.slug) == (f"npz:{tmp_path / 'grey.npz'}", "npz-grey")
    assert source.num_classes == 3 and source.item_id(4) == f"{source.spec}#4"
    image, label = source.load(4)
    np.testing.assert_array_equal(image[..., 0], images[4])
    assert label == 0

    colour = random_image(rng, (3, 4, 4, 3))
    np.savez(tmp_path / "rgb.npz", x=colour)
    unlabelled = resolve_dataset(f"npz:{tmp_path / 'rgb.npz'}")
    assert not unlabelled.has_labels and unlabelled.load(2)[0].shape == (4, 4, 3)
    np.testing.assert_array_equal(unlabelled.labels(), [-1, -1, -1])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "has no array 'x'.*np.savez"),
        ({"x": np.zeros((2, 4, 4), np.float32)}, "is float32, but images must be uint8"),
        ({"x": np.zeros((2, 4, 4, 2), np.uint8)}, "channels last"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0.5, 1.0])}, "integer label"),
    ],
)
def test_bad_npz_archives_name_the_fix(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInputError, match=message):
        resolve_dataset(f"npz:{tmp_path / 'bad.npz'}")


# ---------------------------------------------------------------- benchmark names


def make_fake_root(root: Path) -> Path:
    """A tiny data root: image-folder CIFAR-10 (test only) and a nested Places folder."""
    rng = np.random.default_rng(5)
    for cls, count in (("airplane", 2), ("cat", 3)):
        for i in range(count):
            write_image(
                root / "cifar10" / "test" / cls / f"{i}.png", random_image(rng, (32, 32, 3))
            )
    for i in range(4):
        write_image(root / "places" / "images" / f"p{i}.jpg", random_image(rng, (40, 50, 3)))
    return root


def test_benchmark_image_folder_and_ood_tree_layouts(tmp_path: Path, monkeypatch) -> None:
    root = make_fake_root(tmp_path)
    cifar = resolve_dataset("cifar10", data_root=root)
    assert (cifar.spec, cifar.slug, len(cifar)) == ("cifar10:test", "cifar10-test", 5)
    assert cifar.class_names == ["airplane", "cat"]
    np.testing.assert_array_equal(cifar.labels(), [0, 0, 1, 1, 1])

    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    places = resolve_dataset("places")  # "Places" is matched ignoring case
    assert places.spec == "places:test" and len(places) == 4 and not places.has_labels
    assert places.item_id(0) == str(root / "places" / "images" / "p0.jpg")
    assert resolve_dataset("places:all").spec == "places:test"


def test_benchmark_errors_name_root_layout_and_splits(tmp_path: Path) -> None:
    root = make_fake_root(tmp_path)
    with pytest.raises(BadInputError, match=f"--data-root DIR or set {DATA_ROOT_ENV}"):
        resolve_dataset("cifar10")
    with pytest.raises(BadInputError, match=f"data root {root / 'missing'} is not an existing"):
        resolve_dataset("cifar10", data_root=root / "missing")
    with pytest.raises(
        BadInputError,
        match=r"'cifar10:train' not found under data root .*"
        r"cifar-10-batches-py/.* or cifar10/train/<class>/<image>",
    ):
        resolve_dataset("cifar10:train", data_root=root)
    with pytest.raises(BadInputError, match="no split 'val'; valid splits: train, test"):
        resolve_dataset("cifar10:val", data_root=root)
    with pytest.raises(BadInputError, match="'imagenet:val' not found.*imagenet/val/<class>"):
        resolve_dataset("imagenet:test", data_root=root)


def test_unknown_name_lists_known_names_and_forms() -> None:
    with pytest.raises(BadInputError) as err:
        resolve_dataset("cifar11")
    message = str(err.value)
    for expected in (
        "unknown dataset 'cifar11'",
        "mnist5k",
        "cifar10",
        "imagenet",
        "folder:PATH",
        "npz:PATH",
    ):
        assert expected in message


def write_cifar_pickles(folder: Path, batches: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    """The python CIFAR-10 release: pickled dicts with data (N, 3072) and labels."""
    folder.mkdir(parents=True)
    for name, (rows, labels) in batches.items():
        with open(folder / name, "wb") as stream:
            pickle.dump({"data": rows, "labels": labels, "batch_label": name}, stream, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": [*names, "truck"]}, stream, protocol=2)


def test_cifar_python_release_is_read_channel_planes_to_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    batches = {f"data_batch_{i}": (random_image(rng, (2, 3072)), [i, 9]) for i in range(1, 6)}
    batches["test_batch"] = (random_image(rng, (3, 3072)), [3, 1, 4])
    write_cifar_pickles(tmp_path / "cifar-10-batches-py", batches)
    train = resolve_dataset("cifar10:train", data_root=tmp_path)
    assert len(train) == 10 and train.class_names[9] == "truck"
    np.testing.assert_array_equal(train.labels(), [1, 9, 2, 9, 3, 9, 4, 9, 5, 9])
    test = resolve_dataset("cifar10", data_root=tmp_path)
    rows = batches["test_batch"][0]
    image, label = test.load(2)
    assert image.shape == (32, 32, 3) and label == 4
    for row, col, channel in [(0, 0, 0), (5, 7, 1), (31, 30, 2)]:
        assert image[row, col, channel] == rows[2, channel * 1024 + row * 32 + col]


def test_pickles_that_reference_code_are_refused(tmp_path: Path) -> None:
    batches = {"test_batch": (np.zeros((1, 3072), np.uint8), [0])}
    write_cifar_pickles(tmp_path / "cifar-10-batches-py", batches)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as stream:
        pickle.dump({"data": os.getcwd, "labels": [0]}, stream)
    with pytest.raises(BadInputError, match="refusing to load posix.getcwd"):
        resolve_dataset("cifar10", data_root=tmp_path)


def test_svhn_mat_files_are_transposed_and_label_ten_is_zero(tmp_path: Path) -> None:
    from scipy.io import savemat

    pixels = random_image(np.random.default_rng(13), (32, 32, 3, 4))  # (H, W, C, N) as released
    (tmp_path / "svhn").mkdir()
    savemat(
        tmp_path / "svhn" / "test_32x32.mat", {"X": pixels, "y": np.array([[10], [1], [9], [10]])}
    )
    source = resolve_dataset("svhn", data_root=tmp_path)
    assert len(source) == 4 and source.labels().tolist() == [0, 1, 9, 0]
    np.testing.assert_array_equal(source.load(2)[0], pixels[..., 2])


def test_tiny_imagenet_train_folders_and_annotated_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    base = tmp_path / "tiny-imagenet-200"
    for wnid in ("n02", "n01"):
        write_image(
            base / "train" / wnid / "images" / f"{wnid}_0.JPEG", random_image(rng, (8, 8, 3))
        )
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    annotations = {"val_0.JPEG": "n02", "val_1.JPEG": "n01", "val_2.JPEG": "n02"}
    for name in annotations:
        write_image(base / "val" / "images" / name, random_image(rng, (8, 8, 3)))
    lines = [f"{name}\t{wnid}\t0\t0\t7\t7" for name, wnid in annotations.items()]
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train = resolve_dataset("tinyimagenet:train", data_root=tmp_path)
    assert train.class_names == ["n01", "n02"] and train.labels().tolist() == [0, 1]
    val = resolve_dataset("tinyimagenet", data_root=tmp_path)  # test is an alias of val
    assert val.spec == "tinyimagenet:val" and val.class_names == ["n01", "n02"]
    assert val.labels().tolist() == [1, 0, 1]
    assert val.item_id(1) == str(base / "val" / "images" / "val_1.JPEG")


def test_list_datasets_marks_what_is_found(tmp_path: Path) -> None:
    root = make_fake_root(tmp_path)
    entries = {entry["name"]: entry for entry in list_datasets(root)}
    assert set(entries) == {*data.BUILTIN_SETS, *data.BENCHMARK_SETS}
    assert entries["mnist5k"]["kind"] == "builtin" and entries["mnist5k"]["found"]
    assert entries["cifar10"]["found"] and entries["cifar10"]["path"] == str(root / "cifar10")
    assert entries["cifar10"]["found_splits"] == ["test"]
    assert entries["places"]["found"] and entries["places"]["kind"] == "benchmark"
    assert not entries["imagenet"]["found"] and entries["imagenet"]["path"] is None
    assert entries["imagenet"]["splits"] == ["train", "val"]
    assert "imagenet/{train,val}/<class>/<image>" in entries["imagenet"]["layout"]
    without_root = {entry["name"]: entry for entry in list_datasets(None)}
    assert not without_root["cifar10"]["found"] and without_root["digits"]["found"]


# ---------------------------------------------------------------- benchmark names, folders, counts

# name -> (folder made under the data root, the folder images are read from, benchmark)
OOD_FOLDERS = {
    "places": ("Places/images", "Places", "ImageNet"),
    "places365": ("places365/test_subset", "places365", "CIFAR"),
    "inaturalist": ("iNaturalist/images", "iNaturalist", "ImageNet"),
    "sun": ("SUN/images", "SUN", "ImageNet"),
    "textures": ("dtd/images/banded", "dtd/images", "ImageNet, CIFAR"),
    "lsun": ("LSUN/test", "LSUN", "CIFAR"),
    "lsun-resize": ("LSUN_resize/test", "LSUN_resize", "CIFAR"),
    "isun": ("iSUN/iSUN_patches", "iSUN", "CIFAR"),
}


def make_ood_root(root: Path, images: int = 3) -> Path:
    """Every OOD collection as released, ``images`` tiny images each (2 classes for DTD)."""
    rng = np.random.default_rng(11)
    for made, _, _ in OOD_FOLDERS.values():
        for i in range(images):
            write_image(root / made / f"{i}.jpg", random_image(rng, (6, 6, 3)))
    write_image(root / "dtd" / "images" / "zigzagged" / "z.jpg", random_image(rng, (6, 6, 3)))
    return root


def test_each_ood_name_reads_its_own_release_folder(tmp_path: Path) -> None:
    root = make_ood_root(tmp_path)
    roots = {}
    for name, (_, read_from, _) in OOD_FOLDERS.items():
        source = resolve_dataset(name, data_root=root)
        roots[name] = source.root
        assert source.root == root / read_from, name
        assert source.spec == f"{name}:test"
        assert all(source.path(i).is_relative_to(root / read_from) for i in range(len(source)))
        assert len(source) == (4 if name == "textures" else 3), name
    assert roots["places"] != roots["places365"]  # the ImageNet and the CIFAR set
    assert resolve_dataset("textures", data_root=root).class_names == ["banded", "zigzagged"]


def test_textures_also_reads_a_textures_folder_and_svhn_its_mat_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    for i in range(2):
        write_image(tmp_path / "Textures" / "striped" / f"{i}.jpg", random_image(rng, (6, 6, 3)))
    textures = resolve_dataset("textures", data_root=tmp_path)
    assert textures.root == tmp_path / "Textures" and len(textures) == 2


@pytest.mark.parametrize(
    ("present", "asked", "hint"),
    [
        ("places365", "places", "'places365' (folder places365/)"),
        ("Places", "places365", "'places' (folder Places/)"),
    ],
)
def test_places_and_places365_never_stand_in_for_each_other(
    tmp_path: Path, present: str, asked: str, hint: str
) -> None:
    write_image(tmp_path / present / "0.jpg", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BadInputError, match=f"'{asked}:test' not found.*{re.escape(hint)}"):
        resolve_dataset(asked, data_root=tmp_path)


def test_table_names_benchmark_folder_and_release_count_of_each_ood_set() -> None:
    expected = {
        "places": 10_000,
        "places365": 10_000,
        "inaturalist": 10_000,
        "sun": 10_000,
        "textures": 5_640,
        "svhn": 26_032,
        "lsun": 10_000,
        "lsun-resize": 10_000,
        "isun": 8_925,
    }
    for name, count in expected.items():
        entry = data.BENCHMARK_SETS[name]
        assert entry.expected["test"] == count, name
        assert entry.source, name
    for name, (_, _, benchmark) in OOD_FOLDERS.items():
        assert ", ".join(data.BENCHMARK_SETS[name].benchmarks) == benchmark, name
    assert data.BENCHMARK_SETS["svhn"].benchmarks == ("CIFAR",)
    assert data.BENCHMARK_SETS["imagenet"].expected == {"train": 1_281_167, "val": 50_000}


def _expect(monkeypatch: pytest.MonkeyPatch, name: str, count: int) -> None:
    """Pretend the release of ``name`` has ``count`` test images."""
    import dataclasses

    entry = dataclasses.replace(data.BENCHMARK_SETS[name], expected={"test": count})
    monkeypatch.setitem(data.BENCHMARK_SETS, name, entry)


def test_count_warning_on_a_short_copy_and_none_on_an_exact_one(tmp_path, monkeypatch) -> None:
    root = make_ood_root(tmp_path)  # 3 images per set
    places = resolve_dataset("places", data_root=root)
    message = data.count_warning(places)  # the release's 10,000
    assert message is not None and "\n" not in message
    assert "places:test has 3 images in" in message and str(root / "Places") in message
    assert "10,000" in message and "MOS" in message
    _expect(monkeypatch, "places", 3)
    assert data.count_warning(places) is None
    _expect(monkeypatch, "places", 4)
    assert "places:test has 3 images" in data.count_warning(places)
    for spec in (f"folder:{root / 'Places'}", "digits"):  # no release count to differ from
        assert data.count_warning(resolve_dataset(spec)) is None


class _Notes:
    """A progress that keeps the notes it is given."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def task(self, description: str, total: int | None = None):
        import contextlib

        return contextlib.nullcontext(lambda n=1: None)

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_a_run_notes_a_count_warning_once_per_set(tmp_path, monkeypatch) -> None:
    from gradcli.run import Run

    root = make_ood_root(tmp_path / "data")
    progress = _Notes()
    run = Run(tmp_path / "store", data_root=root, progress=progress)
    _expect(monkeypatch, "sun", 3)
    _expect(monkeypatch, "places", 5)
    for spec in ("sun", "places", "places", "sun"):
        run.resolve(spec)
    assert len(progress.notes) == 1, progress.notes
    assert progress.notes[0].startswith("warning: places:test has 3 images")
    assert "but" in progress.notes[0] and "5;" in progress.notes[0]


def test_list_datasets_counts_found_images_against_the_release(tmp_path, monkeypatch) -> None:
    root = make_ood_root(tmp_path)
    _expect(monkeypatch, "sun", 3)
    entries = {entry["name"]: entry for entry in list_datasets(root, count=True)}
    assert entries["sun"]["counts"] == {"test": 3} and entries["sun"]["expected"] == {"test": 3}
    assert entries["places"]["counts"] == {"test": 3}
    assert entries["places"]["expected"] == {"test": 10_000}
    assert entries["places"]["benchmark"] == "ImageNet"
    assert entries["places365"]["benchmark"] == "CIFAR"
    assert entries["places"]["path"] == str(root / "Places")
    assert entries["places365"]["path"] == str(root / "places365")
    assert entries["textures"]["counts"] == {"test": 4}
    assert entries["imagenet"]["counts"] == {} and not entries["imagenet"]["found"]
    digits = entries["digits"]
    assert digits["counts"] == {"test": len(resolve_dataset("digits"))} == digits["expected"]
    assert list_datasets(root)[0]["counts"] == {}  # counting is asked for


# ---------------------------------------------------------------- preprocessing


def test_preprocess_colour_to_grey_and_normalise_by_hand() -> None:
    images = random_image(np.random.default_rng(8), (2, 5, 7, 3))
    grey = Preprocess((5, 7), 1, (0.4,), (0.2,), resize_rounding="float")
    out = preprocess_batch(torch.from_numpy(images), grey)
    expected = ((images.astype(np.float64) @ LUMA) / 255.0 - 0.4) / 0.2
    assert out.shape == (2, 1, 5, 7) and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0].numpy(), expected, rtol=0, atol=1e-5)
    # uint8 (the default) rounds the luma as PIL's convert("L") does
    rounded = preprocess_batch(torch.from_numpy(images), Preprocess((5, 7), 1, (0.4,), (0.2,)))
    pil = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in images])
    np.testing.assert_allclose(rounded[:, 0].numpy(), (pil / 255.0 - 0.4) / 0.2, atol=1e-6)


def test_preprocess_grey_to_three_channels_with_per_channel_stats() -> None:
    images = random_image(np.random.default_rng(9), (3, 4, 4, 1))
    mean, std = (0.1, 0.5, 0.9), (0.3, 0.2, 0.1)
    out = preprocess_batch(torch.from_numpy(images), Preprocess((4, 4), 3, mean, std))
    assert out.shape == (3, 3, 4, 4)
    for channel in range(3):
        expected = (images[..., 0] / 255.0 - mean[channel]) / std[channel]
        np.testing.assert_allclose(out[:, channel].numpy(), expected, rtol=0, atol=1e-5)


def test_preprocess_resize_shorter_side_then_centre_crop_matches_pil() -> None:
    image = random_image(np.random.default_rng(10), (48, 64, 3))
    image = np.array(Image.fromarray(image).filter(_smooth()))  # keep bilinear rounding small
    preprocess = Preprocess((28, 28), 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize=32)
    out = preprocess_batch(torch.from_numpy(image)[None], preprocess)[0]
    # Shorter side 48 → 32, longer 64 → int(32 * 64 / 48) = 42; crop offsets (2, 7).
    resized = np.asarray(Image.fromarray(image).resize((42, 32), Image.BILINEAR)) / 255.0
    expected = resized[2:30, 7:35].transpose(2, 0, 1)
    assert out.shape == (3, 28, 28)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2.5 / 255)


def _smooth():
    from PIL import ImageFilter

    return ImageFilter.GaussianBlur(2)


def test_preprocess_straight_resize_and_constant_images() -> None:
    constant = np.full((2, 10, 6, 3), 51, np.uint8)
    out = preprocess_batch(
        torch.from_numpy(constant), Preprocess((7, 9), 3, (0.1,) * 3, (0.5,) * 3)
    )
    assert out.shape == (2, 3, 7, 9)
    torch.testing.assert_close(out, torch.full_like(out, (0.2 - 0.1) / 0.5))
    with pytest.raises(BadInputError, match="use a --resize of at least 28"):
        preprocess_batch(
            torch.from_numpy(constant), Preprocess((28, 28), 3, (0,) * 3, (1,) * 3, 20)
        )


# ---------------------------------------------------------------- fingerprints and loaders


def test_file_fingerprint_tracks_edits_and_additions(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name, random_image(rng, (8, 8)))
    spec = f"folder:{tmp_path}"
    first = resolve_dataset(spec).fingerprint()
    assert len(first) == 64 and resolve_dataset(spec).fingerprint() == first
    write_image(tmp_path / "b.png", random_image(rng, (9, 8)))
    edited = resolve_dataset(spec).fingerprint()
    assert edited != first
    os.utime(tmp_path / "a.png", ns=(0, 10**18))
    touched = resolve_dataset(spec).fingerprint()
    assert touched != edited
    write_image(tmp_path / "c.png", random_image(rng, (8, 8)))
    assert resolve_dataset(spec).fingerprint() not in (first, edited, touched)


def test_array_fingerprint_tracks_pixels_and_labels(tmp_path: Path) -> None:
    images = np.zeros((4, 3, 3), np.uint8)
    path = tmp_path / "a.npz"
    fingerprints = []
    for x, y in [(images, [0, 1, 0, 1]), (images, [0, 1, 1, 1]), (images + 1, [0, 1, 1, 1])]:
        np.savez(path, x=x, y=np.array(y))
        fingerprints.append(resolve_dataset(f"npz:{path}").fingerprint())
    assert len(set(fingerprints)) == 3
    assert resolve_dataset(f"npz:{path}").fingerprint() == fingerprints[-1]


def test_loader_follows_indices_and_matches_per_item_preprocessing(tmp_path: Path) -> None:
    source = resolve_dataset("digits")
    preprocess = Preprocess((12, 12), 1, (0.5,), (0.25,))
    indices = [17, 3, 1500, 3, 0]
    batches = list(make_loader(source, preprocess, indices=indices, batch_size=2))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    np.testing.assert_array_equal(y.numpy(), source.labels()[indices])
    for row, index in enumerate(indices):
        image = torch.from_numpy(source.load(index)[0])[None]
        torch.testing.assert_close(x[row], preprocess_batch(image, preprocess)[0])
    with pytest.raises(BadInputError, match="index 1797 is out of range"):
        make_loader(source, preprocess, indices=[0, 1797])


def test_sources_pickle_and_work_in_loader_workers(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    for i in range(5):
        write_image(tmp_path / f"{i}.png", random_image(rng, (10, 10, 3)))
    preprocess = Preprocess((10, 10), 3, (0.5,) * 3, (0.5,) * 3)
    for source in (resolve_dataset(f"folder:{tmp_path}"), resolve_dataset("texture-patches")):
        copy = pickle.loads(pickle.dumps(source))
        assert copy.spec == source.spec and copy.fingerprint() == source.fingerprint()
    source = resolve_dataset(f"folder:{tmp_path}")
    serial = torch.cat([x for x, _ in make_loader(source, preprocess, batch_size=2)])
    parallel = torch.cat(
        [x for x, _ in make_loader(source, preprocess, batch_size=2, num_workers=1)]
    )
    torch.testing.assert_close(parallel, serial)


def test_a_folder_linked_into_itself_is_walked_once(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8), 90).save(tmp_path / label / "0.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "again")  # a loop: a/again/again/...
    os.symlink(tmp_path / "a", tmp_path / "b" / "a-too")  # a's image is b's as well, once
    source = resolve_dataset(f"folder:{tmp_path}")
    assert sorted(source.relative_paths) == ["a/0.png", "b/0.png", "b/a-too/0.png"]


# ---------------------------------------------------------------- rounding and stored size


def _torchvision_pipeline(preprocess: Preprocess):
    """The common evaluation pipeline on PIL images: (Grayscale,) Resize, CenterCrop,
    ToTensor, Normalize."""
    from torchvision import transforms

    steps = [transforms.Grayscale()] if preprocess.channels == 1 else []
    size = preprocess.input_size
    if preprocess.resize is not None:
        steps += [transforms.Resize(preprocess.resize), transforms.CenterCrop(size)]
    else:
        steps.append(transforms.Resize(size))
    steps += [transforms.ToTensor(), transforms.Normalize(preprocess.mean, preprocess.std)]
    return transforms.Compose(steps)


@pytest.mark.parametrize(
    "shape, preprocess",
    [
        ((4, 48, 64, 3), Preprocess((28, 28), 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32)),
        ((4, 300, 200, 3), Preprocess((224, 224), 3, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), 256)),
        ((3, 37, 53, 3), Preprocess((20, 29), 3, (0.5,) * 3, (0.25,) * 3)),  # straight, down
        ((3, 8, 8, 3), Preprocess((32, 32), 3, (0.5,) * 3, (0.25,) * 3)),  # straight, up
        ((3, 90, 31, 3), Preprocess((40, 30), 3, (0.5,) * 3, (0.25,) * 3)),  # height shrinks most
        ((3, 33, 45, 3), Preprocess((28, 28), 1, (0.1307,), (0.3081,))),  # colour → grey model
    ],
)
def test_default_resize_equals_torchvision_pil_pipeline(shape, preprocess) -> None:
    from torchvision import transforms

    assert preprocess.resize_rounding == "uint8"  # the default
    images = random_image(np.random.default_rng(sum(shape)), shape)
    out = preprocess_batch(torch.from_numpy(images), preprocess)  # one batched call
    pipeline = _torchvision_pipeline(preprocess)
    assert any(isinstance(t, transforms.Resize) for t in pipeline.transforms)
    expected = torch.stack([pipeline(Image.fromarray(image)) for image in images])
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_float_rounding_keeps_unrounded_interpolation() -> None:
    import torch.nn.functional as F

    images = random_image(np.random.default_rng(21), (3, 48, 64, 3))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    floats = Preprocess((28, 28), 3, mean, std, resize=32, resize_rounding="float")
    out = preprocess_batch(torch.from_numpy(images), floats)
    # Independently: antialiased bilinear on floats, 48x64 → 32x42, crop at (2, 7), normalise.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    resized = F.interpolate(x, size=(32, 42), mode="bilinear", antialias=True, align_corners=False)
    crop = resized[..., 2:30, 7:35] / 255.0
    expected = (crop - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)
    rounded = preprocess_batch(torch.from_numpy(images), Preprocess((28, 28), 3, mean, std, 32))
    grey_levels = ((rounded - out) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()
    assert 0 < grey_levels.max() <= 1.0 + 1e-3  # up to one grey level apart
    with pytest.raises(BadInputError, match="--resize-rounding must be one of uint8, float"):
        Preprocess((28, 28), 3, mean, std, resize_rounding="int")


def test_stored_size_feeds_images_unresized(tmp_path: Path) -> None:
    images = random_image(np.random.default_rng(22), (5, 8, 8, 3))
    np.savez(tmp_path / "small.npz", x=images, y=np.arange(5) % 2)
    native = Preprocess(None, 3, (0.5,) * 3, (0.25,) * 3)
    loader = make_loader(resolve_dataset(f"npz:{tmp_path / 'small.npz'}"), native, batch_size=2)
    x = torch.cat([batch for batch, _ in loader])
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert native.describe() == "stored size (no resize), mean 0.5,0.5,0.5 std 0.25,0.25,0.25"


def test_a_folder_of_mixed_sizes_without_input_size_asks_for_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)
    for i, side in enumerate((8, 8, 8, 10)):
        write_image(tmp_path / f"{i}.png", random_image(rng, (side, side, 3)))
    source = resolve_dataset(f"folder:{tmp_path}")
    native = Preprocess(None, 3, (0.5,) * 3, (0.25,) * 3)
    for batch_size in (1, 2, 4):  # the odd image alone in a batch, or mixed into one
        with pytest.raises(BadInputError, match=r"differ in size \(8x8 and 10x10 at .*3\.png\)"):
            list(make_loader(source, native, batch_size=batch_size))
    with pytest.raises(BadInputError, match="pass --input-size HxW"):
        list(make_loader(source, native, batch_size=4))
    sized = Preprocess((8, 8), 3, (0.5,) * 3, (0.25,) * 3)  # with a size they all fit
    assert torch.cat([x for x, _ in make_loader(source, sized, batch_size=4)]).shape[1:] == (
        3,
        8,
        8,
    )
