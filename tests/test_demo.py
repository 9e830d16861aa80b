"""The main job end to end on the built-in offline sets, and the README's Python example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradcli.demo import OOD_CANDIDATES, present_ood_sets, run_demo

RESULT_FILES = ("results.json", "results.csv")

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def demo_store(demo_dir):
    """The demo's store in ``demo_dir``: the CLI test's, or made here when that test has not
    run (a test chosen alone, or reordered)."""
    store = demo_dir / "artifacts" / "demo"
    if not (store / "mnist_cnn.pt").exists():
        run_demo(store)
    return store


def test_demo_runs_and_reuses_its_store(demo_dir, cli, monkeypatch):
    monkeypatch.chdir(demo_dir)
    first = cli("demo", "--quiet", "--json")
    assert first.code == 0, first.err
    document = first.json()
    expected = {f"{name}-test" for name in present_ood_sets()}
    assert {"digits-test", "texture-patches-test"} <= expected
    assert set(document["ood"]) == expected
    assert document["head_accuracy"] > 0.9
    by_key = {(r["method"], r["embedding"], r["ood"]): r for r in document["results"]}
    # A trained MNIST model tells textures from digits far better than chance.
    assert by_key[("knn", "grad", "texture-patches-test")]["auroc"] > 0.9
    assert by_key[("energy", "feat", "average")]["auroc"] > 0.9
    store = demo_dir / "artifacts" / "demo"
    assert (store / "results.json").exists() and (store / "mnist_cnn.pt").exists()
    chunk = store / "embed" / "mnist5k-train" / "grad" / "c" / "0" / "0"
    stamp = chunk.stat().st_mtime_ns
    assert document["store"] == str(store.resolve())
    assert document["results_files"] == [str(store.resolve() / f) for f in RESULT_FILES]
    skipped = set(OOD_CANDIDATES) - set(present_ood_sets())
    assert set(document["skipped"]) == skipped
    second = cli("demo", "--quiet", "--json")
    assert second.code == 0
    assert chunk.stat().st_mtime_ns == stamp  # nothing recomputed
    assert second.json()["results"] == document["results"]
    text = cli("demo", "--quiet")  # what ran, what was skipped and why, where things are
    assert text.code == 0, text.err
    assert f"store: {store.resolve()}" in text.out
    assert "against " + ", ".join(sorted(expected, key=document["ood"].index)) in text.out
    for name in skipped:
        assert f"{name}: skipped, not installed (install it with" in text.out


def test_readme_python_example_runs(demo_dir, demo_store, monkeypatch):
    monkeypatch.chdir(demo_dir)
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert set(namespace["scores"]) >= {"knn-grad", "knn-feat", "energy-grad", "knn-ensemble"}
    assert namespace["embedding"]["grad"].shape == (972, 9)
    assert 0.5 < namespace["results"].rows[("knn", "grad")]["texture-patches-test"]["auroc"] <= 1.0


def test_bfloat16_basis_changes_demo_auroc_by_at_most_0_002(demo_store):
    """The demo's AUROCs with a bf16 basis against the float32 run, on its smaller OOD sets."""
    from gradcli.metrics import auroc
    from gradcli.run import Run

    store = demo_store
    exact = Run(store)
    bf16 = Run(store, basis_dtype="bfloat16")
    pairs = {
        "mnist5k:test": "mnist5k-test",
        "digits": "digits-test",
        "texture-patches": "texture-patches-test",
    }
    for spec in pairs:
        bf16.embed(spec, name=f"{pairs[spec]}-bf16")
    for method in ("energy", "knn", "maha", "msp"):
        for emb in ("grad", "ensemble"):
            key = f"{method}-{emb}"
            id_exact = exact.score("mnist5k-test", methods=[method])[key]
            id_bf16 = bf16.score("mnist5k-test-bf16", methods=[method])[key]
            for ood in ("digits-test", "texture-patches-test"):
                ood_exact = exact.score(ood, methods=[method])[key]
                ood_bf16 = bf16.score(f"{ood}-bf16", methods=[method])[key]
                change = abs(auroc(id_bf16, ood_bf16) - auroc(id_exact, ood_exact))
                assert change <= 0.002, (key, ood, change)


def test_train_demo_model_needs_no_progress_object(tmp_path):
    import torch

    from gradcli.demo import train_demo_model
    from gradcli.models import load_model

    path = train_demo_model(tmp_path / "w.pt", epochs=0)  # no steps: the set-up and the save
    state = torch.load(path, weights_only=True)
    assert state.keys() == load_model("mnist_cnn").module.state_dict().keys()


def _demo_copy(demo_store, tmp_path):
    """A copy of the demo store, so refitting its head leaves the shared one alone."""
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(demo_store, copy)
    return copy


def test_default_head_gives_the_same_gradient_energy_whatever_the_seed(demo_store, tmp_path):
    """Five seeds of the default head recipe: gradient Energy's AUROC moves by at most 0.01,
    and the store records the recipe actually run."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from gradcli.run import Run

    run = Run(_demo_copy(demo_store, tmp_path))
    sets = ("mnist5k-test", "texture-patches-test", "digits-test")
    aurocs: dict[str, list[float]] = {"texture-patches-test": [], "digits-test": []}
    for seed in range(5):
        run.fit_head(head={"seed": seed}, overwrite=True)
        scores = {
            n: run.score(n, methods=["energy"], embeddings=["grad"])["energy-grad"] for n in sets
        }
        for ood in aurocs:
            labels = np.r_[np.ones(len(scores[sets[0]])), np.zeros(len(scores[ood]))]
            aurocs[ood].append(roc_auc_score(labels, np.r_[scores[sets[0]], scores[ood]]))
    for ood, values in aurocs.items():
        assert max(values) - min(values) <= 0.01, (ood, values)
        assert min(values) > 0.9, (ood, values)
    recipe = run.store.group_attrs("head")["provenance"]["recipe"]
    n = len(run.store.read("embed/mnist5k-train/labels"))  # 4000 digits
    per_epoch = -(-n // 128)  # batches of 128, the last one of 32 kept
    epochs = max(10, -(-2000 // per_epoch))
    assert recipe["epochs"] == epochs and recipe["steps"] == epochs * per_epoch >= 2000
    assert recipe["batch_size"] == 128 and recipe["schedule"] == "cosine"
    assert recipe["lr"] == 0.1 and "stopping" in recipe


def test_gnorm_ranks_id_above_ood_and_is_minus_the_normalised_gradient_norm(demo_store):
    """gnorm = −‖(g − M)/sqrt(var)‖, with g the energy gradient recomputed here by autograd
    one image at a time; ID scores rank above OOD ones."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from gradcli.data import make_loader, resolve_dataset
    from gradcli.run import Run

    run = Run(demo_store)
    scores = {
        n: run.score(n, methods=["gnorm"], embeddings=["grad"])["gnorm-grad"]
        for n in ("mnist5k-test", "texture-patches-test", "digits-test")
    }
    for ood in ("texture-patches-test", "digits-test"):
        labels = np.r_[np.ones(len(scores["mnist5k-test"])), np.zeros(len(scores[ood]))]
        assert roc_auc_score(labels, np.r_[scores["mnist5k-test"], scores[ood]]) > 0.5

    module = run.model.module.eval()
    names = run.store.attrs["params"]["names"]
    params = dict(module.named_parameters())
    mean = torch.from_numpy(run.store.read("stats/mean")).double()
    std = torch.from_numpy(run.store.read("stats/var")).double().sqrt()
    norms = {}
    for spec, name in (
        ("mnist5k:test", "mnist5k-test"),
        ("texture-patches", "texture-patches-test"),
    ):
        x, _ = next(iter(make_loader(resolve_dataset(spec), run.model.preprocess, batch_size=6)))
        values = []
        for image in x:
            energy = -torch.logsumexp(module(image[None]), dim=1).sum()
            grads = torch.autograd.grad(energy, [params[p] for p in names])
            g = torch.cat([grad.reshape(-1) for grad in grads]).double()
            values.append(torch.linalg.vector_norm((g - mean) / std).item())
        norms[name] = np.array(values)
        np.testing.assert_allclose(scores[name][:6], -norms[name], rtol=1e-3)
    assert norms["texture-patches-test"].mean() > norms["mnist5k-test"].mean()
