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
