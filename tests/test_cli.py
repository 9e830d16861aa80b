"""Every subcommand through the CLI, the store after each stage, resume and bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import PREPROCESS
from sklearn.metrics import roc_auc_score

from gradcli.run import Run
from gradcli.store import RunStore


def _one_line_error(outcome, code: int, *needles: str) -> None:
    assert outcome.code == code, (outcome.code, outcome.err)
    lines = [line for line in outcome.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, outcome.err
    assert "Traceback" not in outcome.err
    for needle in needles:
        assert needle in outcome.err, (needle, outcome.err)


@pytest.fixture(scope="module")
def pipeline(tiny, tmp_path_factory):
    """A store taken through all five stages once, with each stage's CLI outcome."""
    from gradcli.cli import main

    store = tmp_path_factory.mktemp("pipe") / "run"
    steps = {
        "extract": tiny.extract_args(store),
        "embed": ["embed", "--dataset", tiny.test, "--name", "id-test", "--store", store, "-q"],
        "fit": [
            "fit-head",
            "--id-test",
            "id-test",
            "--knn-k",
            "5",
            "--store",
            store,
            "-q",
            "--json",
        ],
        "score": ["score", "--dataset", tiny.ood, "--store", store, "-q", "--json"],
        "evaluate": [
            "evaluate",
            "--ood",
            tiny.ood,
            "--id",
            "id-test",
            "--store",
            store,
            "-q",
            "--json",
        ],
    }
    codes = {name: main([str(a) for a in args]) for name, args in steps.items()}
    return store, codes


def test_every_stage_succeeds(pipeline):
    _, codes = pipeline
    assert codes == {"extract": 0, "embed": 0, "fit": 0, "score": 0, "evaluate": 0}


def test_store_after_extract(pipeline):
    store, _ = pipeline
    run = RunStore(str(store))
    mean, var, basis = run.read("stats/mean"), run.read("stats/var"), run.read("subspace/basis")
    p = 4 * 3 * 9 + 4 + 4 + 4 + 16 * 8 + 8 + 8 * 3 + 3
    assert mean.shape == (p,) and var.shape == (p,) and basis.shape == (p, 2)
    assert (var > 0).all()
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-5)  # K = C - 1
    assert run.attrs["model"]["weights_sha256"]
    assert run.stage_complete("stats") and run.stage_complete("subspace")
    assert run.attrs["params"]["size"] == p


def test_store_after_embed_and_fit(pipeline, tiny):
    store, _ = pipeline
    run = RunStore(str(store))
    assert run.stage_complete("embed/id-test")
    assert run.read("embed/id-test/grad").shape == (45, 2)
    assert run.read("embed/id-test/feat").shape == (45, 8)
    assert run.read("embed/id-test/logits").shape == (45, 3)
    np.testing.assert_array_equal(run.read("embed/id-test/labels"), np.arange(45) % 3)
    assert run.read("embed/id-test/done").all()
    assert run.stage_complete("head")
    for kind in ("grad", "feat"):
        for method in ("react", "bats", "maha", "knn"):
            assert run.stage_complete(f"detectors/{kind}/{method}")


def test_scores_and_results_agree_with_sklearn(pipeline, tiny):
    store, _ = pipeline
    run = RunStore(str(store))
    ood_name = "npz-ood"
    keys = run.children(f"scores/{ood_name}")
    assert {"knn-grad", "knn-feat", "knn-ensemble", "energy-grad", "maha-feat"} <= set(keys)
    np.testing.assert_allclose(
        run.read(f"scores/{ood_name}/knn-ensemble"),
        run.read(f"scores/{ood_name}/knn-feat") + run.read(f"scores/{ood_name}/knn-grad"),
    )
    metrics = run.group_attrs(f"results/{ood_name}")["metrics"]
    for key in ("energy-grad", "knn-feat", "msp-ensemble"):
        id_scores = run.read(f"scores/id-test/{key}")
        ood_scores = run.read(f"scores/{ood_name}/{key}")
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        want = roc_auc_score(labels, np.r_[id_scores, ood_scores])
        assert metrics[key]["auroc"] == pytest.approx(want)
        threshold = np.percentile(id_scores, 5)
        assert metrics[key]["fpr95"] == pytest.approx(np.mean(ood_scores >= threshold))
    results = (store / "results.json").read_text()
    assert '"convention": "paper"' in results
    assert (store / "results.csv").read_text().startswith("method,embedding,ood,fpr95")


def test_evaluate_json_and_rerun_reuses(pipeline, tiny, cli):
    store, _ = pipeline
    outcome = cli(
        "evaluate", "--ood", tiny.ood, "--id", "id-test", "--store", store, "-q", "--json"
    )
    assert outcome.code == 0, outcome.err
    document = outcome.json()
    assert document["id"] == "id-test" and document["ood"] == ["npz-ood"]
    rows = {(r["method"], r["embedding"], r["ood"]) for r in document["results"]}
    assert ("knn", "grad", "average") in rows and ("energy", "ensemble", "npz-ood") in rows
    # The gradient head's accuracy on the labelled ID test set, as a brute-force argmax.
    run = Run(store)
    with torch.no_grad():
        logits = run.load_head()(torch.from_numpy(run.load_embedding("id-test")["grad"]))
    labels = run.load_embedding("id-test")["labels"]
    want = float((logits.argmax(1).numpy() == labels).mean())
    assert document["head_accuracy"] == pytest.approx(want)
    again = cli(*tiny_extract(tiny, store), "--json")
    assert again.code == 0 and again.json()["reused"] is True


def tiny_extract(tiny, store):
    return tiny.extract_args(store)


def test_evaluate_table_marks_best(pipeline, tiny, cli):
    store, _ = pipeline
    outcome = cli("evaluate", "--ood", tiny.ood, "--id", "id-test", "--store", store, "-q")
    assert outcome.code == 0
    assert "FPR95" in outcome.out and "AUROC" in outcome.out and "npz-ood" in outcome.out
    assert "ID positive" in outcome.out


def test_other_weights_are_refused_and_nothing_changes(pipeline, tiny, cli):
    store, _ = pipeline
    before = RunStore(str(store)).read("subspace/basis")
    outcome = cli(*tiny.extract_args(store, weights=tiny.other_weights))
    _one_line_error(outcome, 3, "another model", "--overwrite")
    np.testing.assert_array_equal(RunStore(str(store)).read("subspace/basis"), before)


def test_overwrite_recomputes_with_other_weights(tiny, tmp_path, cli):
    store = tmp_path / "run"
    assert cli(*tiny.extract_args(store)).code == 0
    first = RunStore(str(store)).read("stats/mean")
    outcome = cli(*tiny.extract_args(store, weights=tiny.other_weights), "--overwrite")
    assert outcome.code == 0, outcome.err
    assert not np.array_equal(RunStore(str(store)).read("stats/mean"), first)


def test_unknown_names_and_missing_data_root(tiny, tmp_path, cli, monkeypatch):
    monkeypatch.delenv("GRADCLI_DATA_ROOT", raising=False)
    store = tmp_path / "run"
    args = tiny.extract_args(store)
    bad_dataset = [
        *args[: args.index("--dataset") + 1],
        "nosuchset",
        *args[args.index("--dataset") + 2 :],
    ]
    _one_line_error(cli(*bad_dataset), 2, "nosuchset")
    bad_model = [
        "extract-subspace",
        "--model",
        "resnet9000",
        "--dataset",
        tiny.train,
        "--store",
        store,
    ]
    _one_line_error(cli(*bad_model), 2, "resnet9000")
    no_root = [
        "extract-subspace",
        "--model",
        tiny.model,
        "--weights",
        tiny.weights,
        "--dataset",
        "cifar10:train",
        "--store",
        store,
        *PREPROCESS,
    ]
    _one_line_error(cli(*no_root), 2, "--data-root")
    missing_root = [*no_root, "--data-root", tmp_path / "nowhere"]
    _one_line_error(cli(*missing_root), 2, "nowhere")


def test_corrupt_image_is_named(tiny, tmp_path, cli):
    from PIL import Image

    folder = tmp_path / "imgs"
    for label in ("a", "b", "c"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 90, 30)).save(folder / label / f"{i}.png")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    store = tmp_path / "run"
    args = tiny.extract_args(store)
    args[args.index("--dataset") + 1] = f"folder:{folder}"
    _one_line_error(cli(*args), 2, "broken.png")


def test_commands_need_a_subspace_first(tmp_path, tiny, cli):
    store = tmp_path / "empty"
    _one_line_error(cli("embed", "--dataset", tiny.test, "--store", store), 2, "extract-subspace")
    _one_line_error(cli("fit-head", "--store", store), 2, "extract-subspace")


def test_help_has_examples(cli):
    for command in (
        "extract-subspace",
        "embed",
        "fit-head",
        "score",
        "evaluate",
        "datasets",
        "demo",
        "methods",
    ):
        outcome = cli(command, "--help")
        assert outcome.code == 0
        assert "Example:" in outcome.out, command


def test_datasets_lists_builtins(cli):
    outcome = cli("datasets", "--json")
    assert outcome.code == 0
    names = {row["name"]: row for row in outcome.json()["datasets"]}
    assert names["mnist5k"]["found"] and names["digits"]["found"]
    assert "places" in names


def test_killed_embed_resumes_to_identical_arrays(tiny, tmp_path):
    """SIGKILL an embed between chunks, rerun it, compare with an uninterrupted run."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, size=(3000, 8, 8, 3), dtype=np.uint8)
    big = tmp_path / "big.npz"
    np.savez(big, x=x)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    stores = {}
    for label in ("killed", "clean"):
        store = tmp_path / label
        subprocess.run(
            [sys.executable, "-m", "gradcli", *map(str, tiny.extract_args(store))],
            check=True,
            env=env,
            capture_output=True,
        )
        stores[label] = store
    embed = [
        "embed",
        "--dataset",
        f"npz:{big}",
        "--name",
        "big",
        "--chunk-rows",
        "100",
        "--batch-size",
        "25",
        "-q",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradcli", *embed, "--store", str(stores["killed"])],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done_path = stores["killed"] / "embed" / "big" / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        finished = len(os.listdir(done_path)) if done_path.exists() else 0
        if finished >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "embed finished before it could be killed"
    partial = RunStore(str(stores["killed"])).read("embed/big/done")
    assert 0 < partial.sum() < 30
    for label in ("killed", "clean"):
        subprocess.run(
            [sys.executable, "-m", "gradcli", *embed, "--store", str(stores[label])],
            check=True,
            env=env,
            capture_output=True,
        )
    killed, clean = RunStore(str(stores["killed"])), RunStore(str(stores["clean"]))
    assert killed.read("embed/big/done").all()
    for key in ("grad", "gnorm", "feat", "logits", "labels"):
        np.testing.assert_array_equal(
            killed.read(f"embed/big/{key}"), clean.read(f"embed/big/{key}")
        )


def test_evaluate_ood_places365_exactly_once_a_cifar_run_exists(tiny, tmp_path, cli, monkeypatch):
    """`gradcli evaluate --ood places365` (the CIFAR benchmark's Places) with the store and data
    root taken from the environment."""
    from PIL import Image

    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, count in (("train", 12), ("test", 8)):
        for label, colour in zip(("cat", "dog", "eel"), colours, strict=True):
            folder = root / "cifar10" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (8, 8, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    (root / "places365" / "test").mkdir(parents=True)
    for i in range(10):
        noise = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "places365" / "test" / f"{i}.png")
    monkeypatch.setenv("GRADCLI_STORE", str(tmp_path / "run"))
    monkeypatch.setenv("GRADCLI_DATA_ROOT", str(root))
    args = [
        "extract-subspace",
        "--model",
        tiny.model,
        "--weights",
        tiny.weights,
        "--dataset",
        "cifar10:train",
        "-q",
        *PREPROCESS,
    ]
    assert cli(*args).code == 0
    assert cli("fit-head", "--knn-k", "5", "-q").code == 0
    outcome = cli("evaluate", "--ood", "places365")
    assert outcome.code == 0, outcome.err
    assert "places365-test" in outcome.out and "cifar10-test" in outcome.out
    assert "warning: places365:test has 10 images" in outcome.err  # the release has 10,000


def test_inspect_reports_stages_spectrum_and_reconstruction_error(tiny, tmp_path, cli):
    store = tmp_path / "run"
    args = [*tiny.extract_args(store), "--method", "pca", "--k", "4", "--iterations", "2"]
    assert cli(*args).code == 0
    outcome = cli(
        "inspect",
        "--store",
        store,
        "--dataset",
        tiny.test,
        "--plot",
        tmp_path / "p",
        "--json",
        "-q",
    )
    assert outcome.code == 0, outcome.err
    report = outcome.json()
    assert report["stages"]["subspace"]["complete"] and report["spectrum"]["k"] == 4
    cumulative = report["spectrum"]["cumulative"]
    assert all(a <= b for a, b in zip(cumulative, cumulative[1:], strict=False))
    assert 0 < cumulative[-1] <= 1
    run = RunStore(str(store))
    z, gnorm = run.read("embed/npz-test/grad"), run.read("embed/npz-test/gnorm")
    error = np.sqrt(1 - (z.astype(np.float64) ** 2).sum(1) / gnorm.astype(np.float64) ** 2)
    stored = report["embeddings"]["npz-test"]["reconstruction_error"]
    assert stored["mean"] == pytest.approx(error.mean(), rel=1e-4)
    assert (tmp_path / "p" / "spectrum.png").stat().st_size > 1000
    table = cli("inspect", "--store", store, "-q")
    assert table.code == 0 and "PCA spectrum" in table.out and "npz-test" in table.out
    (tmp_path / "afile").write_text("not a folder")
    wrong = cli("inspect", "--store", store, "--plot", tmp_path / "afile", "-q")
    assert wrong.code == 2 and "is a file" in wrong.err and len(wrong.err.strip().splitlines()) == 1


def test_the_id_test_set_given_to_fit_head_is_evaluate_s_default(tiny, tmp_path, cli):
    """An npz training set has no named test split; the one fit-head was given stands in."""
    store = tmp_path / "run"
    assert cli(*tiny.extract_args(store)).code == 0
    assert cli("fit-head", "--knn-k", "5", "--id-test", tiny.test, "--store", store, "-q").code == 0
    outcome = cli(
        "evaluate", "--ood", tiny.ood, "--method", "knn", "--store", store, "-q", "--json"
    )
    assert outcome.code == 0, outcome.err
    assert outcome.json()["id"] == "npz-test"


def test_version_as_text_and_json(cli):
    from gradcli import __version__

    assert cli("version").out.strip() == __version__
    assert cli("version", "--json").json() == {"version": __version__}


def test_no_variance_reports_no_replaced_variances(tiny, tmp_path, cli):
    scaled = cli(*tiny.extract_args(tmp_path / "scaled"), "--json")
    assert scaled.code == 0 and scaled.json()["variance_replaced"] > 0  # the tiny net has some
    plain = cli(*tiny.extract_args(tmp_path / "plain"), "--no-variance", "--json")
    assert plain.code == 0 and plain.json()["variance_replaced"] == 0
    loud = [a for a in tiny.extract_args(tmp_path / "loud") if a != "--quiet"]
    text = cli(*loud, "--no-variance")
    assert "(no variance scaling)" in text.out and "set to the largest" not in text.err


# -- options given twice, lists, help --------------------------------------------------------


def _params(command: str) -> set[str]:
    """Every option name (and negative name) of a gradcli command."""
    from gradcli.cli import _command

    found = _command().commands[command].params
    return {name for p in found for name in (*p.opts, *getattr(p, "secondary_opts", ()))}


def test_a_single_value_option_given_twice_is_refused(pipeline, tiny, cli):
    store, _ = pipeline
    _one_line_error(
        cli("fit-head", "--knn-k", "3", "--knn-k", "4", "--store", store),
        2,
        "--knn-k given twice; give it once",
    )
    _one_line_error(
        cli("evaluate", "--ood", tiny.ood, "--alpha=1", "--alpha", "2", "--store", store),
        2,
        "--alpha given twice",
    )
    both = cli("evaluate", "--ood", tiny.ood, "--id", "id-test", "--id-test", "id-test")
    _one_line_error(both, 2, "--id", "--id-test", "same option")
    contradiction = cli("fit-head", "--knn-normalise", "--no-knn-normalise", "--store", store)
    _one_line_error(contradiction, 2, "--knn-normalise and --no-knn-normalise contradict")
    alike = cli(
        "evaluate", "--ood", tiny.ood, "--id-test", "id-test", "--method", "knn", "-q",
        "--quiet", "--store", store, "--json",
    )  # fmt: skip
    assert alike.code == 0, alike.err  # a flag twice says the same thing twice


def test_repeated_and_comma_separated_methods_and_embeddings_add_up(pipeline, tiny, cli):
    store, _ = pipeline
    base = ["evaluate", "--ood", tiny.ood, "--id-test", "id-test", "--store", store, "-q", "--json"]

    def rows(*extra):
        outcome = cli(*base, *extra)
        assert outcome.code == 0, outcome.err
        return {(r["method"], r["embedding"]) for r in outcome.json()["results"]}

    repeated = rows("--method", "knn", "--method", "energy", "--embedding", "grad")
    assert repeated == {("knn", "grad"), ("energy", "grad")}  # the last alone before
    assert rows("--method", "knn,energy", "--embedding", "grad") == repeated
    kinds = rows("--method", "knn", "--embedding", "grad", "--embedding", "feat")
    assert kinds == {("knn", "grad"), ("knn", "feat")}


def test_help_shows_value_names_not_python_types_and_version_is_top_level(cli):
    from gradcli import __version__

    for command in ("evaluate", "score", "fit-head", "inspect", "embed"):
        text = cli(command, "--help").out
        assert "<bool>" not in text and "<list" not in text, command
    text = cli("evaluate", "--help").out
    assert "--ood" in text and "SPEC" in text and "PARAM=VALUES" in text and "NAMES" in text
    assert "--id-test" in text and "--id " not in text  # the old name works, hidden
    top = cli("--version")
    assert top.code == 0 and top.out.strip() == __version__
    assert cli("version").out.strip() == __version__


def test_batch_size_zero_gets_the_usual_one_line_message(pipeline, tiny, cli):
    store, _ = pipeline
    outcome = cli("evaluate", "--ood", tiny.ood, "--batch-size", "0", "--store", store, "-q")
    _one_line_error(outcome, 2, "--batch-size must be at least 1, not 0")
    assert "Input should" not in outcome.err


# -- errors suggest commands that exist and work -------------------------------------------

SUGGESTED = re.compile(r"gradcli ([a-z][a-z-]*)([^')]*)")


def _check_suggestions(message: str, running: str) -> list[str]:
    """Every ``gradcli CMD ... --flag`` in ``message`` names flags CMD has; every other
    ``--flag`` is one the command that failed (``running``) has. Returns the suggested
    command lines."""
    commands = []
    for match in SUGGESTED.finditer(message):
        command, rest = match.groups()
        assert command in _commands(), (command, message)
        for flag in re.findall(r"--[a-z][a-z-]*", rest):
            assert flag in _params(command), (flag, command, message)
        commands.append(match.group(0).strip())
    rest = SUGGESTED.sub("", message)
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
        assert flag in _params(running), (flag, running, message)
    return commands


def _commands() -> set[str]:
    from gradcli.cli import _command

    return set(_command().commands)


def _small_train(tmp_path, n: int) -> str:
    from conftest import _blobs

    x, y = _blobs(np.random.default_rng(11), n)
    np.savez(tmp_path / "small.npz", x=x, y=y)
    return f"npz:{tmp_path / 'small.npz'}"


def test_knn_k_too_large_suggests_fit_head_and_that_works(tiny, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("GRADCLI_STORE", str(tmp_path / "run"))
    args = tiny.extract_args(tmp_path / "run")
    args[args.index("--dataset") + 1] = _small_train(tmp_path, 36)
    assert cli(*args).code == 0
    evaluate = ["evaluate", "--ood", tiny.ood, "--id-test", tiny.test, "--method", "knn", "-q"]
    failed = cli(*evaluate)
    _one_line_error(failed, 2, "36")
    (suggested,) = _check_suggestions(failed.err, "evaluate")
    assert suggested == "gradcli fit-head --knn-k 36"
    fixed = cli(*shlex.split(suggested)[1:], "-q")
    assert fixed.code == 0, fixed.err
    again = cli(*evaluate, "--json")
    assert again.code == 0, again.err
    assert (
        RunStore(str(tmp_path / "run")).group_attrs("detectors/grad/knn")["provenance"]["k"] == 36
    )


def test_changed_images_suggest_an_embed_that_works(pipeline, tiny, tmp_path, cli):
    store, _ = pipeline
    x = np.random.default_rng(2).integers(0, 255, size=(12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "other.npz", x=x)
    spec = f"npz:{tmp_path / 'other.npz'}"
    evaluate = ["evaluate", "--ood", spec, "--id-test", "id-test", "--method", "knn"]
    assert cli(*evaluate, "--store", store, "-q").code == 0
    np.savez(tmp_path / "other.npz", x=255 - x)  # the same file, other images
    failed = cli(*evaluate, "--store", store, "-q")
    _one_line_error(failed, 3, "computed from something else")
    (suggested,) = _check_suggestions(failed.err, "evaluate")
    assert suggested.startswith("gradcli embed ") and "--overwrite" in suggested
    assert cli(*shlex.split(suggested)[1:], "-q").code == 0
    fixed = cli(*evaluate, "--store", store, "-q", "--json")
    assert fixed.code == 0, fixed.err
    (name,) = fixed.json()["ood"]
    stored = RunStore(str(store)).group_attrs(f"embed/{name}")["provenance"]["fingerprint"]
    from gradcli.data import resolve_dataset

    assert stored == resolve_dataset(spec).fingerprint()  # the new images are embedded


def test_embedding_made_with_skip_names_the_skip_option(pipeline, tiny, tmp_path, cli):
    from PIL import Image

    store, _ = pipeline
    folder = tmp_path / "imgs"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 60, 20, 200)).save(folder / label / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    spec = f"folder:{folder}"
    assert (
        cli("embed", "--dataset", spec, "--on-bad-image", "skip", "--store", store, "-q").code == 0
    )
    evaluate = ["evaluate", "--ood", spec, "--id-test", "id-test", "--method", "knn"]
    failed = cli(*evaluate, "--store", store, "-q")
    _one_line_error(failed, 3, "--on-bad-image skip")
    assert "--overwrite" not in failed.err
    _check_suggestions(failed.err, "evaluate")
    fixed = cli(*evaluate, "--on-bad-image", "skip", "--store", store, "-q", "--json")
    assert fixed.code == 0, fixed.err
    (name,) = fixed.json()["ood"]
    assert RunStore(str(store)).read(f"embed/{name}/grad").shape == (6, 2)  # broken.png left out


# -- method options, fit-head's note ---------------------------------------------------------

# Each (method, option) `gradcli methods` lists, and the flag that sets it.
OPTION_FLAGS = {
    ("energy", "temperature"): ("fit-head", "--temperature"),
    ("react", "percentile"): ("fit-head", "--react-percentile"),
    ("react", "clip_dims"): ("fit-head", "--clip-dims"),
    ("react", "rule"): ("fit-head", "--clip-rule"),
    ("bats", "rule"): ("fit-head", "--clip-rule"),
    ("bats", "lam"): ("fit-head", "--bats-lambda"),
    ("bats", "clip_dims"): ("fit-head", "--clip-dims"),
    ("knn", "k"): ("fit-head", "--knn-k"),
    ("knn", "normalise"): ("fit-head", "--no-knn-normalise"),
    ("vim", "dim"): ("fit-head", "--vim-dim"),
    ("gradnorm", "temperature"): ("fit-head", "--gradnorm-temperature"),
    ("odin", "temperature"): ("score", "--odin-temperature"),
    ("odin", "epsilon"): ("score", "--odin-epsilon"),
}


def test_every_option_gradcli_methods_lists_has_a_flag(cli):
    listed = {(row["name"], option) for row in cli("methods", "--json").json()["methods"]
              for option in row["options"]}  # fmt: skip
    assert listed == set(OPTION_FLAGS)
    for command, flag in OPTION_FLAGS.values():
        assert flag in _params(command), (command, flag)
    assert "--odin-temperature" in _params("evaluate")


def test_knn_without_normalising_is_the_raw_kth_neighbour_distance(tiny, tmp_path, cli):
    store = tmp_path / "run"
    assert cli(*tiny.extract_args(store)).code == 0
    fit = ["fit-head", "--knn-k", "4", "--no-knn-normalise", "--store", store]
    first = cli(*fit)  # not quiet: the plain progress lines and notes on stderr
    assert first.code == 0, first.err
    assert f"fit-head: embedding {tiny.train} first (no stored embedding)" in first.err
    again = cli(*fit)
    assert again.code == 0 and "first (no stored embedding)" not in again.err
    outcome = cli("score", "--dataset", tiny.ood, "--method", "knn", "--store", store, "-q")
    assert outcome.code == 0, outcome.err
    run = RunStore(str(store))
    train = run.read("embed/npz-train/grad").astype(np.float64)
    ood = run.read("embed/npz-ood/grad").astype(np.float64)
    distances = np.linalg.norm(ood[:, None] - train[None], axis=2)
    want = -np.sort(distances, axis=1)[:, 3]  # no L2 normalisation
    np.testing.assert_allclose(run.read("scores/npz-ood/knn-grad"), want, rtol=1e-4, atol=1e-5)


# -- progress in a log file ------------------------------------------------------------------


class _Log(io.StringIO):
    """A log file that records what had been written at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_progress_off_a_terminal_prints_a_line_every_10_percent_and_flushes(monkeypatch):
    from rich.console import Console

    from gradcli.progress import RichProgress

    monkeypatch.setenv("GRADCLI_PROGRESS_INTERVAL", "3600")
    log = _Log()
    progress = RichProgress(Console(file=log))
    with progress.task("embed x", total=200) as advance:
        for _ in range(200):
            advance(1)
    lines = log.getvalue().splitlines()
    assert lines[0] == "embed x: started (200 steps)"
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines[1:]]
    assert counts == list(range(20, 201, 20))  # every 10 %, and the last is 200/200
    assert lines[-1].startswith("embed x: 200/200 (100%)")
    assert log.flushed[-1] == log.getvalue() and len(log.flushed) >= len(lines)


def test_progress_off_a_terminal_prints_at_the_interval(monkeypatch):
    from rich.console import Console

    from gradcli import progress as module

    clock = [0.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("GRADCLI_PROGRESS_INTERVAL", "20")
    log = _Log()
    with module.RichProgress(Console(file=log)).task("pass", total=1000) as advance:
        for _ in range(12):
            clock[0] += 7.0  # 7 s per step
            advance(1)
    lines = log.getvalue().splitlines()
    # 20 s or more since the last line: at 21 s, 42 s, 63 s and 84 s after the start
    assert [line.split(": ")[1].split(" ")[0] for line in lines[1:-1]] == [
        "3/1,000", "6/1,000", "9/1,000", "12/1,000"
    ]  # fmt: skip
    assert lines[-1].startswith("pass: 12/1,000") and lines[-1].endswith("(finished)")


# -- export to stdout, shard JSON ------------------------------------------------------------


def test_score_export_to_stdout_as_csv_and_json_lines(pipeline, tiny, cli):
    store, _ = pipeline
    base = ["score", "--dataset", tiny.ood, "--method", "knn", "--store", store, "-q"]
    outcome = cli(*base, "--export", "-")
    assert outcome.code == 0, outcome.err
    rows = list(csv.DictReader(io.StringIO(outcome.out)))  # nothing but the rows
    run = RunStore(str(store))
    assert [int(r["index"]) for r in rows] == list(range(30))
    for key in ("knn-grad", "knn-feat", "knn-ensemble"):
        np.testing.assert_array_equal(
            [float(r[key]) for r in rows], run.read(f"scores/npz-ood/{key}").astype(np.float64)
        )
    lines = cli(*base, "--export", "-", "--json")
    assert lines.code == 0, lines.err
    records = [json.loads(line) for line in lines.out.splitlines()]
    assert [r["item"] for r in records] == [r["item"] for r in rows]
    np.testing.assert_array_equal(
        [r["knn-grad"] for r in records], run.read("scores/npz-ood/knn-grad").astype(np.float64)
    )


def test_every_shard_reports_the_same_json_keys_with_real_counts(pipeline, tiny, cli):
    store, _ = pipeline
    embed = ["embed", "--dataset", tiny.test, "--name", "sharded", "--chunk-rows", "10"]
    first = cli(*embed, "--shard", "0/2", "--store", store, "-q", "--json")
    assert first.code == 0, first.err
    marked = int(RunStore(str(store)).read("embed/sharded/done").sum())
    last = cli(*embed, "--shard", "1/2", "--store", store, "-q", "--json")
    assert last.code == 0, last.err
    a, b = first.json(), last.json()
    assert a.keys() == b.keys()
    assert 0 < marked < 5  # 45 rows in chunks of 10: 5 chunks, some done by each shard
    assert (a["complete"], a["chunks_done"], a["chunks"]) == (False, marked, 5)
    assert (b["complete"], b["chunks_done"], b["chunks"]) == (True, 5, 5)


def test_every_command_the_package_and_readme_suggest_has_its_flags():
    """Every ``gradcli CMD ... --flag`` written in an error message, help text or the README
    names a command that exists with every flag it shows (f-string fields are skipped)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"gradcli ([a-z][a-z-]*)((?:[^'\"`)\n|#]|\{[^}]*\})*)")
    files = [*sorted((root / "gradcli").rglob("*.py")), root / "README.md"]
    checked = 0
    for path in files:
        for match in pattern.finditer(path.read_text()):
            command, rest = match.groups()
            if command not in _commands():
                continue  # prose such as "gradcli run store"
            for flag in re.findall(r"--[a-z][a-z-]*", re.sub(r"\{[^}]*\}", "", rest)):
                assert flag in _params(command), (path.name, match.group(0))
                checked += 1
    assert checked > 50


# -- option declarations -----------------------------------------------------------------------


def _defaults(command: str) -> dict:
    """Each parameter of a gradcli command and its default, as Typer built them."""
    from gradcli.cli import _command

    return {p.name: p.default for p in _command().commands[command].params}


def test_cli_defaults_are_the_option_records_and_detectors_defaults():
    import dataclasses
    import inspect

    from gradcli.cli.options import HEAD_FLAGS, head_parameter
    from gradcli.head import HeadOptions
    from gradcli.scores import DETECTORS, INPUT_DETECTORS, get_detector
    from gradcli.scores.options import OPTIONS, DetectorOptions

    fit = _defaults("fit-head")
    for field in dataclasses.fields(DetectorOptions):
        assert fit[field.name] == field.default, field.name
    head = {field.name: field.default for field in dataclasses.fields(HeadOptions)}
    for name in HEAD_FLAGS:
        assert fit[head_parameter(name)] == head[name], name
    for command in ("score", "evaluate"):
        defaults = _defaults(command)
        for option in (o for o in OPTIONS if o.stage == "score"):
            assert defaults[option.name] == option.default, (command, option.name)
    for option in OPTIONS:  # each default is its detectors' own
        for method in option.methods:
            cls = DETECTORS.get(method) or INPUT_DETECTORS[method]
            assert inspect.signature(cls).parameters[option.parameter].default == option.default
    for method, cls in DETECTORS.items():  # the record configures each detector as its defaults
        configured = get_detector(method, **DetectorOptions().for_method(method))
        assert configured.config() == cls().config(), method
    # and the values the flags always had
    assert {k: fit[k] for k in ("knn_k", "react_percentile", "bats_lambda", "clip_rule")} == {
        "knn_k": 50,
        "react_percentile": 90.0,
        "bats_lambda": 1.0,
        "clip_rule": "paper",
    }
    assert (fit["lr"], fit["head_batch_size"], fit["min_steps"], fit["weight_decay"]) == (
        0.1,
        128,
        2000,
        1e-2,
    )
    assert (fit["momentum"], fit["seed"], fit["epochs"], fit["knn_normalise"]) == (
        0.9,
        0,
        None,
        True,
    )
    assert (_defaults("score")["odin_temperature"], _defaults("evaluate")["odin_epsilon"]) == (
        1000.0,
        0.0014,
    )


def test_every_command_shares_one_debug_store_and_json_option():
    from gradcli.cli import _command

    for name, command in _command().commands.items():
        params = {p.name: p for p in command.params}
        debug = params["debug"]
        assert debug.opts == ["--debug"] and debug.is_eager and debug.callback, name
        assert "Show tracebacks" in debug.help, name
        if "store" in params and name != "demo":
            assert params["store"].envvar == "GRADCLI_STORE", name


def test_debug_is_the_option_not_a_word_of_the_command_line(tmp_path, tiny, cli):
    missing = ["embed", "--dataset", tiny.test, "--store", tmp_path / "none"]
    as_value = cli(*missing, "--name", "--debug")  # the value of --name, not the flag
    _one_line_error(as_value, 2, "error: no run store")
    repeated = cli(*missing, "--seed", "1", "--seed", "2", "--debug")  # refused before parsing
    assert repeated.code == 2 and "Traceback" in repeated.err
    assert repeated.err.strip().splitlines()[-1] == "error: --seed given twice; give it once"


def test_the_cli_imports_no_torch_until_a_command_needs_it():
    code = (
        "import sys; from gradcli.cli import main, _command; assert main(['version']) == 0; "
        "_command(''); assert 'torch' not in sys.modules, 'torch'; "
        "_command('fit-head'); assert 'torch' in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_stage_option_defaults_are_the_stage_functions_own():
    """The CLI's PCA, chunking, seed and α defaults are the library's: both read
    gradcli.stages.defaults, and the values are the ones users have always had."""
    import inspect

    from gradcli.run import Run

    for command, function, names in (
        (
            "extract-subspace",
            Run.extract_subspace,
            ("oversample", "iterations", "checkpoint_every", "seed"),
        ),
        ("embed", Run.embed, ("chunk_rows", "seed")),
        ("score", Run.score, ("alpha",)),
        ("evaluate", Run.evaluate, ("alpha",)),
    ):
        cli = _defaults(command)
        library = inspect.signature(function).parameters
        for name in names:
            assert cli[name] == library[name].default, (command, name)
    extract = _defaults("extract-subspace")
    assert (extract["oversample"], extract["iterations"], extract["checkpoint_every"]) == (
        10,
        4,
        50,
    )
    assert (_defaults("embed")["chunk_rows"], _defaults("score")["alpha"]) == (512, 1.0)
