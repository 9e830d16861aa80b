"""The baselines through the run, calibrated thresholds, OOD flags, export and their errors."""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _blobs

from gradcli.models import load_model
from gradcli.run import Run
from gradcli.store import RunStore

PREPROCESS = {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def ready(tiny, tmp_path_factory):
    """A fitted store (ID test embedded as 'id') and a held-out ID calibration set."""
    from gradcli.cli import main

    folder = tmp_path_factory.mktemp("decide")
    store = folder / "run"
    assert main([str(a) for a in tiny.extract_args(store)]) == 0
    assert main(["embed", "--dataset", tiny.test, "--name", "id", "--store", str(store), "-q"]) == 0
    assert main(["fit-head", "--knn-k", "5", "--id-test", "id", "--store", str(store), "-q"]) == 0
    x, y = _blobs(np.random.default_rng(9), 40)
    np.savez(folder / "cal.npz", x=x, y=y)
    return store, f"npz:{folder / 'cal.npz'}"


def _inputs(path: Path) -> torch.Tensor:
    x = np.load(path)["x"]
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25


def _one_line(outcome, code: int, *needles: str) -> None:
    assert outcome.code == code, (outcome.code, outcome.err)
    lines = [line for line in outcome.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in outcome.err, outcome.err
    for needle in needles:
        assert needle in outcome.err, (needle, outcome.err)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fit_head_fits_the_new_baselines(ready):
    store, _ = ready
    run = RunStore(str(store))
    for method in ("vim", "maxlogit", "gradnorm"):
        assert run.stage_complete(f"detectors/feat/{method}")
    assert not run.has("detectors/grad/vim")  # ViM and GradNorm are feature methods
    basis = run.read("detectors/feat/vim/residual_basis")
    assert basis.shape == (8, 4)  # 8-dim features, principal dimension 8 // 2
    np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-10)


def test_gradnorm_and_odin_through_the_run_match_one_image_loops(ready, tiny):
    store, _ = ready
    run = Run(store)
    model = load_model(tiny.model, str(tiny.weights), **PREPROCESS).module
    inputs = _inputs(tiny.root / "ood.npz")
    scores = run.score(
        tiny.ood,
        methods=["gradnorm", "odin"],
        embeddings=["feat"],
        odin_temperature=2.0,
        odin_epsilon=0.05,
    )
    gradnorm, odin = [], []
    last = model[-1]
    for image in inputs:  # GradNorm: autograd of KL(u || softmax) on the real last layer
        model.zero_grad()
        log_p = torch.log_softmax(model(image[None]), dim=1)
        (-(log_p.mean()) - np.log(3)).backward()
        gradnorm.append(last.weight.grad.abs().sum().item())
        x = image[None].clone().requires_grad_(True)  # ODIN: one image at a time
        logits = model(x) / 2.0
        torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
        perturbed = x.detach() - 0.05 * ((x.grad >= 0).float() * 2 - 1) / 0.25
        with torch.no_grad():
            odin.append(torch.softmax(model(perturbed).double() / 2.0, 1).max().item())
    np.testing.assert_allclose(scores["gradnorm-feat"], gradnorm, rtol=1e-4)
    np.testing.assert_allclose(scores["odin-feat"], odin, rtol=1e-6)
    stored = run.store.group_attrs("scores/npz-ood/odin-feat")["provenance"]
    assert stored["odin"] == {"temperature": 2.0, "epsilon": 0.05}
    again = run.score(tiny.ood, methods=["odin"], embeddings=["feat"], odin_temperature=3.0)
    assert not np.allclose(again["odin-feat"], scores["odin-feat"])  # T changed: recomputed
    assert run.store.group_attrs("scores/npz-ood/odin-feat")["provenance"]["odin"] == {
        "temperature": 3.0,
        "epsilon": 0.0014,
    }
    assert "odin-feat" not in run.score(tiny.ood, embeddings=["feat"])  # only when named


def test_calibrate_flag_and_export(ready, tiny, cli, tmp_path):
    store, cal = ready
    target = tmp_path / "out.csv"
    outcome = cli(
        "score",
        "--dataset",
        tiny.ood,
        "--method",
        "knn,vim",
        "--calibrate-on",
        cal,
        "--tpr",
        "0.9",
        "--export",
        target,
        "--store",
        store,
        "-q",
        "--json",
    )
    assert outcome.code == 0, outcome.err
    document = outcome.json()
    run = RunStore(str(store))
    for key in ("knn-grad", "knn-feat", "knn-ensemble", "vim-feat"):
        held_out = run.read(f"scores/npz-cal/{key}")
        threshold = np.percentile(held_out, 10)
        assert run.group_attrs(f"calibration/{key}")["threshold"] == pytest.approx(threshold)
        assert np.mean(held_out >= threshold) >= 0.9
        scores = run.read(f"scores/npz-ood/{key}")
        np.testing.assert_array_equal(run.read(f"flags/npz-ood/{key}"), scores < threshold)
        assert document["scores"][key]["flagged_ood"] == int((scores < threshold).sum())
    with open(target, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30
    assert rows[7]["item"] == f"{tiny.ood}#7" and rows[7]["index"] == "7"
    exported = np.array([float(r["knn-grad"]) for r in rows])
    np.testing.assert_array_equal(exported, run.read("scores/npz-ood/knn-grad"))
    flags = np.array([r["knn-grad_ood"] == "1" for r in rows])
    np.testing.assert_array_equal(flags, run.read("flags/npz-ood/knn-grad"))
    # A later score without --calibrate-on keeps flagging with the stored threshold.
    later = cli("score", "--dataset", "id", "--method", "knn", "--store", store, "-q")
    assert later.code == 0 and "flagged OOD" in later.out
    threshold = run.group_attrs("calibration/knn-feat")["threshold"]
    np.testing.assert_array_equal(
        RunStore(str(store)).read("flags/id/knn-feat"), run.read("scores/id/knn-feat") < threshold
    )
    # Another ensemble weight than the calibrated one is refused, nothing written.
    before = _snapshot(store)
    stale = cli("score", "--dataset", "id", "--method", "knn", "--alpha", "0.5", "--store", store)
    _one_line(stale, 3, "knn-ensemble", "alpha", "--calibrate-on")
    assert _snapshot(store) == before


def test_evaluate_reports_realised_acceptance(ready, tiny, cli):
    store, cal = ready
    assert cli("score", "--dataset", cal, "--calibrate-on", cal, "--store", store, "-q").code == 0
    outcome = cli(
        "evaluate", "--ood", tiny.ood, "--id", "id", "--method", "knn", "--store", store, "--json"
    )
    assert outcome.code == 0, outcome.err
    calibration = outcome.json()["calibration"]
    run = RunStore(str(store))
    for key in ("knn-grad", "knn-feat", "knn-ensemble"):
        threshold = np.percentile(run.read(f"scores/npz-cal/{key}"), 5)
        assert calibration[key]["threshold"] == pytest.approx(threshold)
        id_scores = run.read(f"scores/id/{key}")
        assert calibration[key]["id_acceptance"] == pytest.approx(np.mean(id_scores >= threshold))
        ood_scores = run.read(f"scores/npz-ood/{key}")
        accepted = calibration[key]["ood_acceptance"]["npz-ood"]
        assert accepted == pytest.approx(np.mean(ood_scores >= threshold))
    table = cli("evaluate", "--ood", tiny.ood, "--id", "id", "--method", "knn", "--store", store)
    assert "ID accept@λ" in table.out


def test_bad_decision_options_are_one_line_errors(ready, tiny, cli, tmp_path, monkeypatch):
    store, cal = ready
    before = _snapshot(store)
    base = ["score", "--dataset", "id", "--store", store, "-q"]
    _one_line(cli(*base, "--calibrate-on", cal, "--tpr", "1.5"), 2, "(0, 1]", "--tpr 0.95")
    _one_line(cli(*base, "--tpr", "0.9"), 2, "--calibrate-on")
    _one_line(cli(*base, "--export", tmp_path / "nowhere" / "x.csv"), 2, "does not exist", "mkdir")
    _one_line(cli(*base, "--export", tmp_path / "x.xlsx"), 2, ".csv or .parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    _one_line(cli(*base, "--export", tmp_path / "x.parquet"), 2, "pip install pyarrow")
    monkeypatch.undo()
    _one_line(cli(*base, "--method", "odim"), 2, "odim", "odin")
    _one_line(cli(*base, "--method", "odin", "--odin-temperature", "0"), 2, "--odin-temperature")
    assert _snapshot(store) == before


def test_odin_needs_the_embedded_images(ready, tiny, cli, tmp_path):
    store, _ = ready
    moved = tmp_path / "gone.npz"
    shutil.copy(tiny.root / "ood.npz", moved)
    assert cli("embed", "--dataset", f"npz:{moved}", "--name", "gone", "--store", store).code == 0
    assert cli("score", "--dataset", "gone", "--method", "knn", "--store", store, "-q").code == 0
    moved.unlink()
    before = _snapshot(store)
    outcome = cli("score", "--dataset", "gone", "--method", "odin", "--store", store, "-q")
    _one_line(outcome, 2, "odin needs the images of 'gone'", str(moved))
    assert _snapshot(store) == before
    export = tmp_path / "gone.csv"  # export still works, naming rows by embedding and row
    outcome = cli(
        "score", "--dataset", "gone", "--method", "knn", "--export", export, "--store", store
    )
    assert outcome.code == 0, outcome.err
    assert "gone#0" in export.read_text().splitlines()[1]


def test_methods_command_lists_every_method(cli):
    outcome = cli("methods", "--json")
    assert outcome.code == 0
    names = [row["name"] for row in outcome.json()["methods"]]
    assert {"maxlogit", "gradnorm", "vim", "odin", "knn"} <= set(names)
    assert "Example:" in cli("methods", "--help").out


def test_a_calibration_set_too_small_for_its_tpr_is_noted(ready, cli, tmp_path):
    store, cal = ready
    copy = tmp_path / "run"
    shutil.copytree(store, copy)
    base = ["score", "--dataset", cal, "--method", "knn", "--calibrate-on", cal, "--store", copy]
    # 40 images at TPR 0.95: 2 lie below λ, far too few for a stable threshold.
    noted = cli(*base)
    assert noted.code == 0, noted.err
    message = " ".join(noted.err.split())
    assert "from 40 images rests on the lowest 2 of them" in message, noted.err
    assert "at least 200 held-out ID images" in message
    # At TPR 0.5, 20 lie below it: nothing to note.
    enough = cli(*base, "--tpr", "0.5")
    assert enough.code == 0 and "rests on" not in enough.err
    run = RunStore(str(copy))
    threshold = run.group_attrs("calibration/knn-grad")["threshold"]
    assert threshold == pytest.approx(np.percentile(run.read("scores/npz-cal/knn-grad"), 50))


def test_a_refit_detector_asks_for_recalibration_and_overwrite_drops_thresholds(
    ready, cli, tmp_path
):
    store, cal = ready
    copy = tmp_path / "run"
    shutil.copytree(store, copy)
    base = ["--store", copy, "-q"]
    assert cli("score", "--dataset", cal, "--method", "knn", "--calibrate-on", cal, *base).code == 0
    assert cli("fit-head", "--knn-k", "3", "--id-test", "id", *base).code == 0
    for embedding in ("grad", "both"):
        score = ["score", "--dataset", "id", "--method", "knn", "--embedding", embedding]
        refused = cli(*score, *base)
        _one_line(refused, 3, "detector was refit (fit-head)", "--calibrate-on npz-cal")
    assert cli("fit-head", "--knn-k", "3", "--id-test", "id", "--overwrite", *base).code == 0
    run = RunStore(str(copy))
    assert not run.has("calibration") and not run.has("flags")
    assert cli("score", "--dataset", "id", "--method", "knn", *base).code == 0
