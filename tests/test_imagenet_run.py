"""The ImageNet run as a user types it: `gradcli evaluate --ood places --model resnet50 ...` on
a store that does not exist yet runs every stage and prints the table.

A tiny ImageNet-style data root (three wnid class folders of small JPEGs under
``imagenet/{train,val}``, and ``Places/`` and ``places365/`` as released) and a local weights
file of a torchvision resnet50 whose fc has three classes. What the command line adds to the
user's, to stay within seconds on two CPU cores (the stages run the same code either way):
gradients over ``fc.*`` with images fed at 32×32 (the full 25.6M-parameter gradient at
224×224 takes minutes), no worker processes, and the score methods named beside ``avg``, all
but ``maha`` and ``vim``: on resnet50's 2048-dim features each fits by a 2048×2048
eigendecomposition, about 20 s of the two cores together.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from gradcli import layout
from gradcli.store import RunStore

WNIDS = ("n01440764", "n01443537", "n01484850")
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))
TRAIN_PER_CLASS, VAL_PER_CLASS, OOD_IMAGES = 20, 5, 12
SCORES = "msp,energy,maxlogit,react,bats,knn,gradnorm,residual,gnorm"  # all but maha, vim
USER_FLAGS = ("--method", SCORES, "--params", "fc.*", "--input-size", "32", "--workers", "0")


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> dict[str, Path]:
    """The data root and the resnet50 weights file."""
    base = tmp_path_factory.mktemp("imagenet")
    root = base / "data"
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for wnid, colour in zip(WNIDS, COLOURS, strict=True):
            for i in range(count):
                noisy = np.clip(np.array(colour) + rng.normal(0, 25, (20, 20, 3)), 0, 255)
                _save(root / "imagenet" / split / wnid / f"{wnid}_{i}.JPEG", noisy)
    for i in range(OOD_IMAGES):
        _save(root / "Places" / "images" / f"{i}.jpg", rng.integers(0, 256, (20, 20, 3)))
    for i in range(6):  # the CIFAR benchmark's set: another folder, other images
        _save(root / "places365" / "test" / f"{i}.png", rng.integers(0, 256, (32, 32, 3)))
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=len(WNIDS))
    torch.save(model.state_dict(), base / "r50.pt")
    return {"root": root, "weights": base / "r50.pt"}


def _table_rows(text: str) -> dict[str, list[dict[str, float]]]:
    """The printed tables: title kind (grad/feat/ens) -> rows {method, FPR95, AUROC}."""
    tables: dict[str, list[dict[str, float]]] = {}
    kind = None
    for line in text.splitlines():
        title = re.match(r"\s*(feature|gradient|ensemble) scores against ID", line)
        if title:
            kind = title.group(1)
            tables[kind] = []
            continue
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if kind and len(cells) >= 3 and re.fullmatch(r"[a-z]+", cells[0]):
            tables[kind].append(
                {"method": cells[0], "fpr95": float(cells[1]), "auroc": float(cells[2])}
            )
    return tables


def test_evaluate_runs_every_stage_of_a_new_imagenet_run(imagenet, tmp_path, cli, monkeypatch):
    store = tmp_path / "r50"
    monkeypatch.setenv("GRADCLI_DATA_ROOT", str(imagenet["root"]))
    monkeypatch.setenv("GRADCLI_STORE", str(store))
    command = ["evaluate", "--ood", "places", "--model", "resnet50"]
    outcome = cli(*command, "--weights", imagenet["weights"], "--method", "avg", *USER_FLAGS)
    assert outcome.code == 0, outcome.err

    # every stage is in the store
    run = RunStore(str(store))
    assert run.attrs["model"]["spec"] == "resnet50" and run.attrs["id_train"] == "imagenet:train"
    for stage in (layout.STATS, layout.SUBSPACE, layout.HEAD):
        assert run.stage_complete(stage), stage
    assert run.shape(layout.BASIS) == (2048 * 3 + 3, len(WNIDS) - 1)  # fc.*, K = C - 1
    sizes = {"imagenet-train": 60, "imagenet-val": 15, "places-test": OOD_IMAGES}
    for name, rows in sizes.items():
        assert run.stage_complete(layout.embedding(name)), name
        assert run.read(layout.embedding(name, "grad")).shape == (rows, len(WNIDS) - 1)
    for kind in layout.EMBEDDINGS:
        assert run.stage_complete(layout.detector(kind, "energy")), kind
    assert run.has(layout.result("places-test"))

    # the printed tables hold the places numbers, equal to a recomputation from the scores
    assert "places-test" in outcome.out and "imagenet-val" in outcome.out
    tables = _table_rows(outcome.out)
    assert set(tables) == {"feature", "gradient", "ensemble"}
    assert {row["method"] for rows in tables.values() for row in rows} == set(SCORES.split(","))
    assert {"energy", "knn", "residual"} <= {row["method"] for row in tables["gradient"]}
    for kind, key in (("gradient", "grad"), ("feature", "feat"), ("ensemble", "ensemble")):
        for row in tables[kind]:
            id_scores = run.read(layout.scores("imagenet-val", f"{row['method']}-{key}"))
            ood_scores = run.read(layout.scores("places-test", f"{row['method']}-{key}"))
            labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
            auroc = 100 * roc_auc_score(labels, np.r_[id_scores, ood_scores])
            assert row["auroc"] == pytest.approx(auroc, abs=0.006), (kind, row)
            threshold = np.percentile(id_scores, 5)
            assert 0 <= row["fpr95"] <= 100 and np.isfinite(threshold)

    # what it said on the way: the subspace, and copies unlike the releases
    assert "subspace avg K=2 over 6,147 parameters of resnet50" in outcome.err
    assert "warning: places:test has 12 images" in outcome.err
    assert "warning: imagenet:train has 60 images" in outcome.err

    # the same command again reuses the stored run
    again = cli(*command, "--weights", imagenet["weights"], "--method", "avg", *USER_FLAGS)
    assert again.code == 0, again.err
    assert "[reused from store]" in again.err and _table_rows(again.out) == tables
    other = cli("evaluate", "--ood", "places", "--method", "pca")  # the store's is avg
    assert other.code != 0 and "holds a subspace made with --method avg" in other.err

    # `places` and `places365` are different sets: each read from its own folder
    folders = {}
    for name in ("places", "places365"):
        exported = cli("score", "--dataset", name, "--method", "energy", "--export", "-", "-q")
        assert exported.code == 0, exported.err
        items = [Path(row["item"]) for row in csv.DictReader(io.StringIO(exported.out))]
        folders[name] = {item.relative_to(imagenet["root"]).parts[0] for item in items}
    assert folders == {"places": {"Places"}, "places365": {"places365"}}


def test_new_run_options_need_model_and_avg_is_a_subspace_method(imagenet, tmp_path, cli):
    store = str(tmp_path / "none")
    outcome = cli("evaluate", "--ood", "places", "--weights", imagenet["weights"], "--store", store)
    assert outcome.code != 0 and "--weights start a new run and need --model" in outcome.err
    assert not Path(store).exists()
    both = cli("evaluate", "--ood", "places", "--method", "avg,pca", "--model", "resnet50")
    assert both.code != 0 and "both subspace methods" in both.err


def test_datasets_shows_found_against_expected_counts(imagenet, cli):
    outcome = cli("datasets", "--data-root", imagenet["root"])
    assert outcome.code == 0, outcome.err
    rows = {
        cells[0]: cells
        for line in outcome.out.splitlines()
        if len(cells := [c.strip() for c in line.split("│")[1:-1]]) > 3 and cells[0]
    }
    assert rows["places"][1:4] == ["ImageNet", "yes", "test 12/10,000"]
    assert rows["places365"][1:4] == ["CIFAR", "yes", "test 6/10,000"]
    assert rows["imagenet"][1:4] == ["ImageNet", "yes", "train 60/1,281,167"]
    assert rows["sun"][2:4] == ["no", "test -/10,000"]
    document = cli("datasets", "--data-root", imagenet["root"], "--json").json()
    entries = {entry["name"]: entry for entry in document["datasets"]}
    assert entries["imagenet"]["counts"] == {"train": 60, "val": 15}
    assert entries["places"]["path"] == str(imagenet["root"] / "Places")
    assert entries["places365"]["path"] == str(imagenet["root"] / "places365")
