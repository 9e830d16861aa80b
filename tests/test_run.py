"""The Python API: stored reduced gradients against an independent computation."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import count_committed_batches

from gradcli.budget import BASIS_SHARE
from gradcli.errors import BadInputError
from gradcli.grads import energy
from gradcli.models import load_model
from gradcli.run import Run
from gradcli.stages import embed as embed_stage
from gradcli.stages import embeddings as embeddings_stage
from gradcli.stages import stats as stats_stage


def test_embedding_equals_normalised_projected_loop_gradients(tiny, tmp_path):
    run = Run(tmp_path / "run")
    run.set_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    run.extract_subspace(tiny.train, batch_size=16)
    name = run.embed(tiny.test, batch_size=7, chunk_rows=10)
    stored = run.load_embedding(name)

    model = load_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    module = model.module
    x = np.load(tiny.root / "test.npz")["x"]
    inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    rows = []
    for i in range(len(inputs)):  # the reference: one backward pass per sample
        module.zero_grad()
        energy(module(inputs[i : i + 1]))[0].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).double())
    g = torch.stack(rows).numpy()

    train = np.load(tiny.root / "train.npz")["x"]
    train_inputs = (torch.from_numpy(train).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    train_rows = []
    for i in range(len(train_inputs)):
        module.zero_grad()
        energy(module(train_inputs[i : i + 1]))[0].backward()
        train_rows.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).double())
    g_train = torch.stack(train_rows).numpy()
    mean, var = g_train.mean(0), g_train.var(0)
    var = np.where(var > 0, var, var.max())  # zero variances take the largest one (DESIGN §2)
    np.testing.assert_allclose(run.store.read("stats/mean"), mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(run.store.read("stats/var"), var, rtol=1e-3, atol=1e-9)

    basis = run.store.read("subspace/basis").astype(np.float64)
    normalised = (g - mean) / np.sqrt(var)
    want = normalised @ basis
    scale = np.abs(want).max()
    assert np.abs(stored["grad"] - want).max() / scale < 1e-4
    np.testing.assert_allclose(stored["gnorm"], np.linalg.norm(normalised, axis=1), rtol=1e-4)
    labels = np.load(tiny.root / "train.npz")["y"]
    class_means = np.stack(
        [((g_train[labels == c] - mean) / np.sqrt(var)).mean(0) for c in range(3)]
    )
    # The centred class means sum to zero (weighted by class size): they span C - 1 dimensions.
    assert basis.shape == (g.shape[1], 2)
    q, _ = np.linalg.qr(class_means[:2].T)
    np.testing.assert_allclose(np.abs(q.T @ basis), np.eye(2), atol=1e-4)


def _tiny_run(tiny, path, **kwargs) -> Run:
    run = Run(path, **kwargs)
    run.set_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    run.extract_subspace(tiny.train, batch_size=16)
    return run


@contextlib.contextmanager
def _interrupted_after(monkeypatch, batches: int):
    """Within the block, an embedding stops like a Ctrl-C after ``batches`` row batches."""
    original = embed_stage._embed_rows
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(embed_stage, "_embed_rows", interrupting)
    try:
        yield
    finally:
        monkeypatch.setattr(embed_stage, "_embed_rows", original)


def test_memory_budget_splits_into_blocks_with_identical_results(tiny, tmp_path, monkeypatch):
    whole = _tiny_run(tiny, tmp_path / "whole")
    whole.embed(tiny.test, name="t", batch_size=8, chunk_rows=10)
    # 283 parameters x (K=2 float32 + 8) = 16 bytes a row: a 3,500-byte budget leaves 2,100
    # bytes for basis rows, at most 131 rows a block: at least three blocks. (The AG
    # subspace's class arrays need more than that budget: it is extracted without one.)
    _tiny_run(tiny, tmp_path / "split")
    split = Run(tmp_path / "split", memory_budget=3500)
    blocks = split._row_blocks(split.selection, 2)
    assert len(blocks) >= 3
    with _interrupted_after(monkeypatch, 5), pytest.raises(KeyboardInterrupt):
        split.embed(tiny.test, name="t", batch_size=8, chunk_rows=10)
    assert not split.store.stage_complete("embed/t")
    resumed = Run(tmp_path / "split", memory_budget=3500)
    resumed.embed(tiny.test, name="t", batch_size=8, chunk_rows=10)
    a, b = whole.load_embedding("t"), resumed.load_embedding("t")
    for key in ("grad", "gnorm", "feat", "logits", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not resumed.store.has("embed/t/partial")


def test_scoring_an_interrupted_embedding_by_name_finishes_it(tiny, tmp_path, monkeypatch):
    whole = _tiny_run(tiny, tmp_path / "whole")
    whole.embed(tiny.test, name="t", batch_size=8, chunk_rows=10, max_samples=30, seed=4)
    run = _tiny_run(tiny, tmp_path / "cut")
    with _interrupted_after(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        run.embed(tiny.test, name="t", batch_size=8, chunk_rows=10, max_samples=30, seed=4)
    assert not run.store.stage_complete("embed/t")
    resumed = Run(tmp_path / "cut")
    assert (
        embeddings_stage.ensure_embedded(resumed, "t", batch_size=8) == "t"
    )  # the name, not a dataset spec
    a, b = whole.load_embedding("t"), resumed.load_embedding("t")
    for key in ("grad", "gnorm", "feat", "logits", "labels"):
        np.testing.assert_array_equal(a[key], b[key])


def test_bfloat16_embedding_close_to_float32(tiny, tmp_path):
    run = _tiny_run(tiny, tmp_path / "run")
    run.embed(tiny.test, name="f32", batch_size=8)
    bf16 = Run(tmp_path / "run", basis_dtype="bfloat16")
    bf16.embed(tiny.test, name="bf16", batch_size=8)
    exact, approx = run.load_embedding("f32")["grad"], bf16.load_embedding("bf16")["grad"]
    assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) < 1e-2
    assert not np.array_equal(approx, exact)


WIDE_MLP = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(192, 1024), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))
"""

PEAK_CHILD = """
import json, sys
from gradcli.run import Run

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

store, budget, model, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
size, batch = int(sys.argv[5]), (None if sys.argv[6] == "auto" else int(sys.argv[6]))
chosen = []  # batch sizes the run picks itself
automatic = Run._batch_size


def recording_batch_size(self, *args):
    chosen.append(automatic(self, *args))
    return chosen[-1]


Run._batch_size = recording_batch_size
run = Run(store, memory_budget=budget)
run.set_model(model, input_size=size, mean=[0.5] * 3, std=[0.25] * 3)
run.embed(data, name="warm", batch_size=2, max_samples=2)  # imports, thread pools, caches
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
run.embed(data, name="measured", batch_size=batch)
print(json.dumps({"over_base": status("VmHWM") - base, "blocks": len(run._row_blocks(
    run.selection, int(run.store.group_attrs("subspace")["k"]))), "batch": chosen}))
"""

PEAK_SLACK = 48 << 20  # allocator and interpreter noise in a peak-memory measurement

CONV_NET = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
"""


def _peak_over_base(tmp_path, model_source: str, size: int, n: int, runs: dict) -> dict:
    """Peak resident memory of embedding ``n`` random images (size × size) in a fresh process,
    over its resident size before, for each ``{label: (budget, batch)}`` (batch "auto" or a
    number), on copies of one store with an AG subspace."""
    import json
    import shutil
    import subprocess
    import sys

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:
        pytest.skip(f"peak resident memory cannot be reset here ({error})")
    (tmp_path / "net.py").write_text(model_source)
    (tmp_path / "child.py").write_text(PEAK_CHILD)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(n) % 10)
    model, data = f"{tmp_path / 'net.py'}:make", f"npz:{tmp_path / 'd.npz'}"
    run = Run(tmp_path / "store")
    run.set_model(model, input_size=size, mean=[0.5] * 3, std=[0.25] * 3)
    run.extract_subspace(data, method="avg", batch_size=10)
    results = {"params": run.selection.size, "k": int(run.store.group_attrs("subspace")["k"])}
    for label, (budget, batch) in runs.items():
        store = tmp_path / f"store-{label}"
        shutil.copytree(tmp_path / "store", store)
        args = [str(store), str(budget), model, data, str(size), str(batch)]
        out = subprocess.run(
            [sys.executable, str(tmp_path / "child.py"), *args],
            capture_output=True,
            text=True,
            check=True,
        )
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def test_peak_memory_stays_within_the_budget(tmp_path):
    """A 5.4 M-parameter MLP, K = 9: a 96 MiB budget splits the 196 MB basis into blocks and
    the embedding's peak resident memory stays within budget + model + allocator slack, while
    an unsplit run's does not (so the bound means something)."""
    results = _peak_over_base(
        tmp_path, WIDE_MLP, 8, 20, {"small": (96 << 20, 4), "large": (4 << 30, 4)}
    )
    num_params, k = results["params"], results["k"]
    model_bytes = 4 * num_params
    small, large = results["small"], results["large"]
    print(f"peak over base: {small} with 96 MiB, {large} unsplit")
    assert small["blocks"] >= 3 and large["blocks"] == 1
    assert num_params * k * 4 > 2 * (96 << 20) * BASIS_SHARE  # far over its share
    assert small["over_base"] <= (96 << 20) + model_bytes + PEAK_SLACK, small
    assert large["over_base"] > (96 << 20) + model_bytes + PEAK_SLACK, large


def test_automatic_batch_size_keeps_peak_memory_within_the_budget(tmp_path):
    """Activations dominate a small convolutional net on 32×32 images (~1.8 MB a sample): with
    no --batch-size the batch is chosen from the budget and the peak resident memory stays
    within it, while the whole set in one batch, explicitly asked for, goes well over (so the
    bound means something); a larger budget gives a larger batch."""
    budget = 96 << 20
    results = _peak_over_base(
        tmp_path,
        CONV_NET,
        32,
        240,
        {"auto": (budget, "auto"), "roomier": (4 * budget, "auto"), "whole": (budget, 240)},
    )
    auto, roomier, whole = results["auto"], results["roomier"], results["whole"]
    print(f"peak over base: {auto} automatic, {roomier} with 4x the budget, {whole} one batch")
    assert 1 < auto["batch"][0] < roomier["batch"][0] < 240
    assert whole["batch"] == []  # given, not chosen
    assert auto["over_base"] <= budget + PEAK_SLACK, auto
    assert roomier["over_base"] <= 4 * budget + PEAK_SLACK, roomier
    assert whole["over_base"] > budget + PEAK_SLACK, whole


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_wrong_arguments_from_python_are_refused_before_anything_is_written(tiny, tmp_path):
    run = _tiny_run(tiny, tmp_path / "run")
    before = _files(tmp_path / "run")
    cases = [
        (lambda: run.embed(tiny.test, batch_size=-3), "--batch-size must be at least 1, not -3"),
        (lambda: run.embed(tiny.test, batch_size=0), "--batch-size must be at least 1, not 0"),
        (lambda: run.embed(tiny.test, batch_size=2.5), "--batch-size must be a whole number"),
        (lambda: run.embed(tiny.test, max_samples=5, seed=-1), "--seed must be a whole number"),
        (
            lambda: run.extract_subspace(tiny.train, method="pca", k=2.5, overwrite=True),
            "--k must be a whole number, not 2.5",
        ),
        (lambda: run.score(tiny.test, alpha="1"), "--alpha must be a finite number"),
        (lambda: run.score(tiny.test, embeddings=["gradient"]), "unknown embedding(s) gradient"),
        (lambda: run.score(tiny.test, methods=5), "methods takes names (strings), not [5]"),
        (lambda: run.fit_head(head={"epoch": 2}), "head: unknown option(s) epoch"),
        (lambda: run.fit_head(head=[2]), "head must be a HeadOptions or a dict"),
        (lambda: run.calibrate(tiny.test, tpr="0.95"), "the target TPR must be in (0, 1]"),
        (lambda: run.load_embedding("nope"), "no embedding 'nope'"),
        (lambda: run.flags("nope", ["knn-grad"]), "no embedding 'nope'"),
        (lambda: Run(tmp_path / "other", memory_budget=-1), "memory_budget must be a positive"),
        (lambda: Run(tmp_path / "other", memory_budget="lots"), "--memory-budget takes a size"),
    ]
    for call, needle in cases:
        with pytest.raises(BadInputError) as refused:
            call()
        assert needle in str(refused.value) and "\n" not in str(refused.value)
    assert _files(tmp_path / "run") == before
    assert not (tmp_path / "other").exists()
    # The refused batch size was not recorded: a plain embed runs with the automatic one.
    assert run.embed(tiny.test) == "npz-test"


def test_python_callers_may_pass_paths_single_names_and_option_dicts(tiny, tmp_path):
    run = _tiny_run(tiny, tmp_path / "run", memory_budget="512M")
    assert run.memory_budget == 512 << 20
    test_file = Path(tiny.test.removeprefix("npz:"))
    assert run.embed(test_file) == "npz-test"  # a Path to an .npz file is npz:PATH
    assert run.store.group_attrs("embed/npz-test")["provenance"]["dataset"] == tiny.test
    run.fit_head(test=tiny.test, head={"epochs": 2}, detectors={"knn_k": 3})
    assert run.store.group_attrs("head")["provenance"]["epochs"] == 2
    assert run.store.group_attrs("detectors/grad/knn")["provenance"]["k"] == 3
    scores = run.score(tiny.ood, methods="knn,msp", embeddings="grad")
    assert sorted(scores) == ["knn-grad", "msp-grad"]
    every = run.score(tiny.ood, methods="all", embeddings="grad")
    assert {"knn-grad", "residual-grad", "gnorm-grad"} <= set(every) and "odin-grad" not in every
    # An embedding is found by its name or by its dataset's spec.
    by_spec, by_name = run.load_embedding(tiny.ood), run.load_embedding("npz-ood")
    np.testing.assert_array_equal(by_spec["grad"], by_name["grad"])
    assert run.flags(tiny.ood, "knn-grad") == {}  # nothing calibrated yet
    # Another file of the same name does not silently take the first one's default name.
    other = tmp_path / "elsewhere" / test_file.name
    other.parent.mkdir()
    with np.load(test_file) as arrays:
        np.savez(other, x=arrays["x"][:7], y=arrays["y"][:7])
    with pytest.raises(BadInputError, match="already holds the embedding of") as clash:
        run.embed(f"npz:{other}")
    assert "--name NAME" in str(clash.value)
    assert run.embed(f"npz:{other}", name="other-test") == "other-test"
    # ... and is then found under that name by its spec, for scoring too.
    assert run.embedding_for(f"npz:{other}") == "other-test"
    scored = run.score(f"npz:{other}", methods="knn", embeddings="grad")["knn-grad"]
    np.testing.assert_array_equal(scored, run.store.read("scores/other-test/knn-grad"))
    assert run.load_embedding(f"npz:{other}")["grad"].shape[0] == 7
    assert run.load_embedding(tiny.test)["grad"].shape[0] != 7


def test_a_torchscript_model_embeds_as_its_python_twin(tiny, tmp_path):
    """TorchScript takes neither hooks nor torch.func: its per-sample gradients come one
    backward at a time and its features from a forward pass of their own, and must equal what
    the same network written in Python gives through the layer engine."""
    (tmp_path / "seq.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef make():\n"
        "    torch.manual_seed(3)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()\n"
    )
    twin = load_model(f"{tmp_path / 'seq.py'}:make").module
    with torch.no_grad():  # non-trivial running statistics
        twin[1].running_mean.uniform_(-0.5, 0.5)
        twin[1].running_var.uniform_(0.5, 2.0)
    torch.save(twin.state_dict(), tmp_path / "seq.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        torch.jit.trace(twin, torch.randn(1, 3, 8, 8)).save(str(tmp_path / "traced.pt"))
    stored = {}
    for label, spec, weights in (
        ("python", f"{tmp_path / 'seq.py'}:make", str(tmp_path / "seq.pt")),
        ("script", str(tmp_path / "traced.pt"), None),
    ):
        run = Run(tmp_path / label)
        run.set_model(spec, weights, input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
        run.extract_subspace(tiny.train, batch_size=16)
        stored[label] = (run.load_embedding(run.embed(tiny.test, batch_size=7)), run)
    python, script = stored["python"], stored["script"]
    for key in ("stats/mean", "stats/var", "subspace/basis"):
        np.testing.assert_allclose(script[1].store.read(key), python[1].store.read(key), 1e-4, 1e-7)
    for key in ("grad", "gnorm", "feat", "logits"):
        np.testing.assert_allclose(script[0][key], python[0][key], rtol=1e-4, atol=1e-5)


def test_a_moved_store_and_a_moved_weights_file_are_the_same_model(tiny, tmp_path):
    import shutil

    from gradcli.errors import StaleStoreError

    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(tiny.weights, first / "weights.pt")  # kept inside the store, as the demo does
    run = Run(first)
    preprocess = {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}
    run.set_model(tiny.model, str(first / "weights.pt"), **preprocess)
    run.extract_subspace(tiny.train, batch_size=16)
    want = run.load_embedding(run.embed(tiny.test))
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    # The store finds its weights at their new place (same sha256) and reuses what it holds.
    again = Run(moved)
    assert again.model.weights == str(moved / "weights.pt")
    assert again.store.stage_complete("embed/npz-test")
    np.testing.assert_array_equal(again.load_embedding("npz-test")["grad"], want["grad"])
    # The same file under another path is the same model: nothing is recomputed or dropped.
    copy = tmp_path / "elsewhere.pt"
    shutil.copy(moved / "weights.pt", copy)
    digest = again.store.stage_digest("subspace")
    again.set_model(tiny.model, str(copy), **preprocess)
    assert again.store.stage_digest("subspace") == digest
    assert again.store.stage_complete("embed/npz-test")
    # Other weights are another model, as before.
    with pytest.raises(StaleStoreError, match="another model"):
        again.set_model(tiny.model, str(tiny.other_weights), **preprocess)


# -- extract-subspace: options, memory, resumable statistics ---------------------------------
MANY_CLASSES = """
from torch import nn

def make():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 200),
    )
"""
PREPROCESS_KW = {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}


def _never_passes_over_data(monkeypatch) -> None:
    """Any pass over the data (the statistics pass, or any gradient capture) fails the test."""
    from gradcli.grads import LayerGradients

    def forbidden(*args, **kwargs):
        raise AssertionError("a pass over the data started")

    monkeypatch.setattr(stats_stage, "compute_statistics", forbidden)
    monkeypatch.setattr(LayerGradients, "capture", forbidden)


def test_every_invalid_extract_option_is_refused_before_the_statistics_pass(
    tiny, tmp_path, monkeypatch
):
    run = Run(tmp_path / "run")
    run.set_model(tiny.model, str(tiny.weights), **PREPROCESS_KW)
    before = _files(tmp_path / "run")
    _never_passes_over_data(monkeypatch)
    cases = [
        ({"method": "pca", "k": 2, "iterations": -1}, "--iterations must be at least 1, not -1"),
        ({"method": "pca", "k": 2, "iterations": 0}, "--iterations must be at least 1, not 0"),
        ({"method": "pca", "k": 2, "oversample": -2}, "--oversample must be at least 0, not -2"),
        ({"method": "pca", "k": 2, "checkpoint_every": 0}, "--checkpoint-every must be at least 1"),
        ({"checkpoint_every": -5}, "--checkpoint-every must be at least 1, not -5"),
        ({"method": "pca", "k": 2, "iterations": 2.5}, "--iterations must be a whole number"),
        ({"method": "pca", "k": 2, "iteration_dtype": "fp8"}, "--iteration-dtype must be auto"),
        ({"method": "pca", "k": 0}, "--k must be at least 1"),
        ({"method": "pca"}, "--method pca needs --k"),
        ({"method": "svd"}, "unknown --method 'svd'"),
        ({"max_samples": 0}, "--max-samples must be at least 1, not 0"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"seed": -1}, "--seed must be a whole number"),
        ({"k": 3}, "--method avg gives K = C - 1 = 2 (centred class means); drop --k or use"),
        ({"method": "pca", "k": 500}, "--k 500 exceeds the rank"),  # needs the model and data
        ({"method": "pca", "k": 2, "batch_size": 8}, None),  # the budget below: no layer plan
    ]
    for options, needle in cases:
        target = run if needle else Run(tmp_path / "run", memory_budget=1000)
        with pytest.raises(BadInputError) as refused:
            target.extract_subspace(tiny.train, **options)
        message = str(refused.value)
        assert "\n" not in message
        assert (needle or "(90 x 12, 8.44 KiB)") in message, message
    assert _files(tmp_path / "run") == before
    assert not run.store.has("stats")


def _many_class_data(tmp_path) -> tuple[str, np.ndarray]:
    """400 random images, two of each of 200 classes: (spec, images)."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 255, size=(400, 8, 8, 3), dtype=np.uint8)
    tmp_path.mkdir(parents=True, exist_ok=True)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(400) % 200)
    return f"npz:{tmp_path / 'd.npz'}", x


def _many_classes(tmp_path, budget=None) -> Run:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "many.py").write_text(MANY_CLASSES)
    torch.manual_seed(3)
    run = Run(tmp_path / "store", memory_budget=budget)
    run.set_model(f"{tmp_path / 'many.py'}:make", **PREPROCESS_KW)
    return run


def test_average_gradient_over_the_budget_is_refused_before_any_pass(tiny, tmp_path, monkeypatch):
    from gradcli.budget import format_size

    run = _many_classes(tmp_path, budget="64K")
    p = (27 * 4 + 4) + (4 + 4) + (16 * 8 + 8) + (8 * 200 + 200)  # conv, BN, two linear
    assert p == sum(t.numel() for t in run.model.module.parameters())
    data, _ = _many_class_data(tmp_path)
    _never_passes_over_data(monkeypatch)
    with pytest.raises(BadInputError) as refused:
        run.extract_subspace(data)
    # 6 float64 vectors of 2,056 parameters = 96.4 KiB, over 64 KiB; the 200 classes add nothing.
    assert str(refused.value) == (
        f"--method avg on {p:,} parameters (200 classes) needs {format_size(6 * 8 * p)} for "
        f"the statistics pass (6 float64 vectors of {format_size(8 * p)}), over the memory "
        "budget's 64 KiB: select fewer parameters with --params '7.*', or raise --memory-budget"
    )
    assert not run.store.has("stats")
    # The fix it names is checked the same way: the last layer alone (8 x 200 + 200 = 1,800
    # parameters) still needs 6 x 8 x 1,800 bytes = 84.4 KiB, over 64 KiB.
    with pytest.raises(BadInputError, match="1,800 parameters .* needs 84.4 KiB"):
        run.extract_subspace(data, params=["7.*"])


def test_average_gradient_statistics_fit_a_budget_below_the_class_means(tiny, tmp_path):
    """200 classes x 2,056 parameters under a 1 MiB budget: the class means (1.6 MiB float32,
    3.3 MiB as float64 sums) never need to fit, yet are each class's mean gradient, and the
    mean and variance are those of a PCA statistics pass (which writes no class means) and of
    a per-sample loop."""
    data, x = _many_class_data(tmp_path)
    avg = _many_classes(tmp_path / "avg", budget="1M")
    avg.extract_subspace(data, batch_size=16)
    assert avg.store.shape("stats/class_means") == (200, 2056)
    pca = _many_classes(tmp_path / "pca", budget="4M")
    pca.extract_subspace(data, method="pca", k=2, batch_size=16, iterations=1)
    assert not pca.store.has("stats/class_means")
    assert pca.store.group_attrs("stats")["provenance"]["class_sums"] is False
    for name in ("mean", "var"):  # the same sums of gradients from other batches
        want = pca.store.read(f"stats/{name}")
        np.testing.assert_allclose(
            avg.store.read(f"stats/{name}"), want, rtol=1e-5, atol=1e-6 * np.abs(want).max()
        )

    module = pca.model.module
    inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    rows = []
    for i in range(len(inputs)):
        module.zero_grad()
        energy(module(inputs[i : i + 1]))[0].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).double())
    g = torch.stack(rows).numpy()
    np.testing.assert_allclose(pca.store.read("stats/mean"), g.mean(0), rtol=1e-4, atol=1e-7)
    var = g.var(0)
    var = np.where(var > 0, var, var.max())
    np.testing.assert_allclose(pca.store.read("stats/var"), var, rtol=1e-3, atol=1e-9)
    labels = np.arange(400) % 200
    means = np.stack([g[labels == c].mean(0) for c in range(200)])
    np.testing.assert_allclose(avg.store.read("stats/class_means"), means, rtol=1e-4, atol=1e-7)
    assert avg.store.group_attrs("stats")["class_counts"] == [2] * 200


@pytest.mark.parametrize("method", ["avg", "pca"])
def test_interrupted_statistics_pass_resumes_bitwise(method, tiny, tmp_path, monkeypatch):
    """90 samples in 12 batches of 8, checkpointed every 5. PCA (selection order): a stop
    request after 7 batches saves them and the rerun passes over the last 34 samples only; a
    kill in batch 8 resumes from the checkpoint after 5 (the last 50 samples). AG (class by
    class, 3 classes of 30 in batches of 8, 8, 8, 6): both save class 0 only, finished after
    4 batches, and the rerun passes over classes 1 and 2 (60 samples). All give the
    statistics and the subspace of a pass never interrupted, bit for bit."""
    from gradcli.errors import Interrupted
    from gradcli.grads import LayerGradients

    options = {"batch_size": 8, "checkpoint_every": 5, "seed": 1}
    if method == "pca":
        options.update(method="pca", k=2, iterations=1)

    def fresh(path, should_stop=None) -> Run:
        run = Run(path, should_stop=should_stop)
        run.set_model(tiny.model, str(tiny.weights), **PREPROCESS_KW)
        return run

    clean = fresh(tmp_path / "clean")
    clean.extract_subspace(tiny.train, **options)

    polls = {"n": 0}

    def stop_after_seven() -> bool:
        polls["n"] += 1
        return polls["n"] >= 7

    stopped = fresh(tmp_path / "stopped", stop_after_seven)
    with pytest.raises(Interrupted, match="statistics"):
        stopped.extract_subspace(tiny.train, **options)
    state = stopped.store.group_attrs("stats/state")
    if method == "pca":
        assert state["cursor"] == 7 and state["count"] == 56 and state["batch"] == 8
    else:
        assert state["done"] == [0] and state["count"] == 30 and state["batch"] == 8

    original = LayerGradients.capture
    captures = {"n": 0}

    def killed_in_batch_eight(self, x):
        captures["n"] += 1
        if captures["n"] == 8:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(LayerGradients, "capture", killed_in_batch_eight)
    killed = fresh(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        killed.extract_subspace(tiny.train, **options)
    state = killed.store.group_attrs("stats/state")
    assert state["cursor"] == 5 if method == "pca" else state["done"] == [0]
    monkeypatch.setattr(LayerGradients, "capture", original)

    seen = count_committed_batches(monkeypatch)
    paths = ["stats/mean", "stats/var", "subspace/basis"]
    if method == "avg":
        paths.append("stats/class_means")
    left = (34, 50) if method == "pca" else (60, 60)
    for path, remaining in zip((tmp_path / "stopped", tmp_path / "killed"), left, strict=True):
        seen.clear()
        resumed = fresh(path)
        resumed.extract_subspace(tiny.train, **options)
        assert sum(seen) == remaining, seen
        for array in paths:
            np.testing.assert_array_equal(resumed.store.read(array), clean.store.read(array))
        assert resumed.store.group_attrs("stats")["samples"] == 90
        assert not resumed.store.has("stats/state")
    if method == "avg":
        counts = resumed.store.group_attrs("stats")["class_counts"]
        assert counts == clean.store.group_attrs("stats")["class_counts"] == [30, 30, 30]


def test_average_gradient_k_is_c_minus_1_and_the_summary_says_why(tiny, tmp_path):
    run = Run(tmp_path / "run")
    run.set_model(tiny.model, str(tiny.weights), **PREPROCESS_KW)
    summary = run.extract_subspace(tiny.train, k=2, batch_size=16)  # K = C - 1: accepted
    assert summary["k"] == 2 == run.store.read("subspace/basis").shape[1]
    assert summary["k_reason"].startswith("K = C - 1 = 2: the 3 class means are centred")
    pca = run.extract_subspace(tiny.train, method="pca", k=4, batch_size=16, overwrite=True)
    assert pca["k"] == 4 and pca["k_reason"] == "K = 4, as asked (--k)"
