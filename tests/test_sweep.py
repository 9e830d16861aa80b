"""Sweep plans: parsing, canonical names, validation before anything is computed."""

from __future__ import annotations

import numpy as np
import pytest

from gradcli.errors import BadInputError
from gradcli.stages.sweep import SWEEP_PARAMETERS, check_sweep_dims, check_sweeps, parse_sweep


def test_parse_and_check_give_canonical_names_and_values():
    assert parse_sweep("k=1,5,10") == ("k", [1.0, 5.0, 10.0])
    assert parse_sweep("T=0.5, 2") == ("temperature", [0.5, 2.0])  # aliases, spaces
    plan = check_sweeps({"knn_k": [5, 1, 5.0], "lam": [0.5], "clip-dims": [2]})
    assert plan == {"k": [5, 1], "lambda": [0.5], "d": [2]}  # duplicates dropped, order kept
    assert all(isinstance(v, int) for v in plan["k"] + plan["d"])
    assert set(SWEEP_PARAMETERS) == {"k", "percentile", "lambda", "temperature", "d"}


@pytest.mark.parametrize(
    ("sweeps", "needle"),
    [
        ({"depth": [1]}, "unknown sweep parameter 'depth'"),
        ({"k": []}, "--sweep k needs at least one value"),
        ({"k": [2.5]}, "--sweep k takes whole numbers, got 2.5"),
        ({"k": [0]}, "--sweep k=0:"),  # the detector's own check, named by the sweep
        ({"percentile": [150]}, "--sweep percentile=150:"),
    ],
)
def test_impossible_sweeps_are_refused_before_any_work(sweeps, needle):
    with pytest.raises(BadInputError) as refused:
        check_sweeps(sweeps)
    assert needle in str(refused.value)


def test_parse_sweep_errors_and_clipped_dims_against_widths():
    for text in ("k", "=1,2", "k=", "k=a,b"):
        with pytest.raises(BadInputError, match="--sweep"):
            parse_sweep(text)
    assert check_sweep_dims({"d": [2, 9]}, {"grad": 9, "feat": 64}) == {"grad": [], "feat": []}
    assert check_sweep_dims({"d": [10]}, {"grad": 9, "feat": 64}) == {"grad": [10], "feat": []}
    with pytest.raises(BadInputError, match=r"exceeds .*\(9 reduced gradient \(K\)\)"):
        check_sweep_dims({"d": [10]}, {"grad": 9})


def test_clipped_dims_apply_to_each_embedding_within_its_own_width():
    assert check_sweep_dims({"d": [1, 5, 8]}, {"grad": 3, "feat": 8, "x": 5}) == {
        "grad": [5, 8],
        "feat": [],
        "x": [8],
    }
    assert check_sweep_dims({"k": [100]}, {"grad": 3}) == {"grad": []}
    with pytest.raises(BadInputError, match="d=9 exceeds the dimensions of every embedding"):
        check_sweep_dims({"d": [9]}, {"feat": 8})


@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    """A fitted store of the tiny model: 2-dim reduced gradients, 8-dim features."""
    from gradcli.cli import main

    store = tmp_path_factory.mktemp("sweep") / "run"
    assert main([str(a) for a in tiny.extract_args(store)]) == 0
    assert main(["embed", "--dataset", tiny.test, "--name", "id", "--store", str(store), "-q"]) == 0
    assert main(["fit-head", "--id-test", "id", "--store", str(store), "-q"]) == 0
    return store


def _energy(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))


def test_sweep_over_d_on_embeddings_of_different_widths(fitted, tiny):
    """d=1,5 on K=2 gradients and 8 features: d=5 runs on features only; each result matches
    ReAct computed by hand (the paper's rule on gradients: one pooled threshold on the last d)."""
    from gradcli.run import Run

    run = Run(fitted)
    store = run.store
    assert store.shape("embed/id/grad")[1] < 5 <= store.shape("embed/id/feat")[1]
    results = run.evaluate([tiny.ood], id_dataset="id", methods=["react"], sweeps={"d": [1, 5]})
    found = {(r["value"], r["method"], r["embedding"], r["ood"]): r for r in results.sweeps}
    assert {(v, e) for v, m, e, o in found if m == "react"} == {
        (1, "grad"),
        (1, "feat"),
        (1, "ensemble"),
        (5, "feat"),  # d=5 is wider than the gradients: neither they nor the ensemble have it
    }
    names = ("npz-train", "id", "npz-ood")
    arrays = {n: {k: store.read(f"embed/{n}/{k}") for k in ("grad", "feat")} for n in names}

    head = {n: store.read(f"head/{n}").astype(np.float64) for n in store.children("head")}

    def bn(z):
        scaled = (z - head["bn.running_mean"]) / np.sqrt(head["bn.running_var"] + 1e-5)
        return scaled * head["bn.weight"] + head["bn.bias"]

    tau = np.percentile(bn(arrays["npz-train"]["grad"].astype(np.float64))[:, -1], 90)
    grad = {}
    for n in ("id", "npz-ood"):
        h = bn(arrays[n]["grad"].astype(np.float64))
        h[:, -1] = np.minimum(h[:, -1], tau)
        grad[n] = _energy(h @ head["fc.weight"].T + head["fc.bias"])
    row = found[1, "react", "grad", "npz-ood"]
    assert row["auroc"] == pytest.approx(_auroc(grad["id"], grad["npz-ood"]))

    last = run.model.classifier
    weight = last.weight.detach().double().numpy()
    bias = last.bias.detach().double().numpy()
    tau = np.percentile(arrays["npz-train"]["feat"], 90)  # features: one global threshold
    feat = {}
    for n in ("id", "npz-ood"):
        z = arrays[n]["feat"].astype(np.float64)
        z[:, -5:] = np.minimum(z[:, -5:], tau)
        feat[n] = _energy(z @ weight.T + bias)
    row = found[5, "react", "feat", "npz-ood"]
    assert row["auroc"] == pytest.approx(_auroc(feat["id"], feat["npz-ood"]))


def _auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(labels, np.r_[id_scores, ood_scores]))


def test_a_new_detector_option_is_one_table_entry(monkeypatch):
    """A detector option declared in OPTIONS alone becomes a field of the options record with
    the detector's default, goes to that detector, is sweepable and is a fit-head flag."""
    import dataclasses
    from importlib import import_module

    from gradcli.cli import _command
    from gradcli.scores import DETECTORS, KNN
    from gradcli.scores import options as options_module
    from gradcli.scores.options import OPTIONS, DetectorOption, Sweep, options_class
    from gradcli.stages.sweep import sweep_aliases, sweep_help, sweep_parameters

    class WideKNN(KNN):
        """KNN with one more option (a stand-in for a new detector's)."""

        name = "wideknn"
        option_names = (*KNN.option_names, "width")

        def __init__(self, k: int = 50, normalise: bool = True, width: int = 7) -> None:
            super().__init__(k, normalise)
            self.width = width

    monkeypatch.setitem(DETECTORS, "wideknn", WideKNN)
    entry = DetectorOption(
        "wideknn_width",
        ("wideknn",),
        "width",
        "WideKNN: the width.",
        sweep=Sweep("width", "width (wideknn)", "WideKNN width", ("w",), 5),
    )
    table = (*OPTIONS, entry)
    record = options_class(table)
    field = {f.name: f for f in dataclasses.fields(record)}["wideknn_width"]
    assert (field.default, field.type) == (7, int)
    assert record().for_method("wideknn") == {"width": 7}
    assert record(wideknn_width=3).for_method("wideknn") == {"width": 3}
    assert record().for_method("knn") == {"k": 50}  # the others as before
    parameter = sweep_parameters(table)["width"]
    assert (parameter.option, parameter.methods, parameter.integer) == ("width", ("wideknn",), True)
    assert sweep_aliases(table)["w"] == "width" and "width (wideknn)" in sweep_help(table)
    app = import_module("gradcli.cli.app")  # the module (gradcli.cli.app is the Typer app)
    monkeypatch.setattr(options_module, "OPTIONS", table)
    monkeypatch.setattr(app, "_COMMANDS", {})
    params = {p.name: p for p in _command("fit-head").commands["fit-head"].params}
    assert params["wideknn_width"].opts == ["--wideknn-width"]
    assert params["wideknn_width"].default == 7
    monkeypatch.undo()
    app._COMMANDS.clear()  # the command tree of the real table again
    assert "wideknn_width" not in {p.name for p in _command().commands["fit-head"].params}
