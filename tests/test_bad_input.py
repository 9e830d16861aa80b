"""The bad-input catalogue: exit code, one line naming problem and fix, store untouched."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODEL_SOURCE, PREPROCESS
from PIL import Image

from gradcli.store import FORMAT_VERSION, RunStore


def _snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _fails(cli, code: int, *needles: str, store: Path | None = None, args=()):
    before = _snapshot(store) if store else None
    outcome = cli(*args, "-q") if args and args[0] not in ("datasets",) else cli(*args)
    assert outcome.code == code, (outcome.code, outcome.err)
    lines = [line for line in outcome.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in outcome.err, outcome.err
    for needle in needles:
        assert needle in outcome.err, (needle, outcome.err)
    if store is not None:  # everything written before is still there, byte for byte
        after = _snapshot(store)
        assert {k: after.get(k) for k in before} == before, "the store changed"
    return outcome


@pytest.fixture(scope="module")
def ready(tiny, tmp_path_factory):
    """A store with a subspace, the test set embedded and the head fitted."""
    from gradcli.cli import main

    store = tmp_path_factory.mktemp("ready") / "run"
    assert main([str(a) for a in tiny.extract_args(store)]) == 0
    assert main(["embed", "--dataset", tiny.test, "--name", "id", "--store", str(store), "-q"]) == 0
    assert main(["fit-head", "--knn-k", "5", "--id-test", "id", "--store", str(store), "-q"]) == 0
    return store


def _images(folder: Path, sizes=((8, 8),), modes=("RGB",), per_class=3, classes=("a", "b")):
    for label in classes:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size, mode = sizes[i % len(sizes)], modes[i % len(modes)]
            Image.new(mode, size, 90 + 20 * i).save(folder / label / f"{i}.png")


def test_unknown_model_and_dataset_leave_the_store_alone(ready, tiny, cli):
    args = [str(a) for a in tiny.extract_args(ready)]
    bad_model = list(args)
    bad_model[bad_model.index("--model") + 1] = "resnet9000"
    _fails(cli, 2, "resnet9000", store=ready, args=bad_model)
    _fails(
        cli,
        2,
        "nosuchset",
        "folder:PATH",
        store=ready,
        args=["embed", "--dataset", "nosuchset", "--store", ready],
    )


def test_missing_and_empty_data_root(ready, cli, tmp_path, monkeypatch):
    monkeypatch.delenv("GRADCLI_DATA_ROOT", raising=False)
    _fails(
        cli, 2, "--data-root", store=ready, args=["embed", "--dataset", "svhn", "--store", ready]
    )
    _fails(
        cli,
        2,
        "nowhere",
        store=ready,
        args=["embed", "--dataset", "svhn", "--data-root", tmp_path / "nowhere", "--store", ready],
    )
    (tmp_path / "empty").mkdir()
    _fails(
        cli,
        2,
        "svhn",
        store=ready,
        args=["embed", "--dataset", "svhn", "--data-root", tmp_path / "empty", "--store", ready],
    )


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "zero-byte"])
def test_bad_image_fails_by_default_and_skip_counts_it(damage, ready, cli, tmp_path):
    folder = tmp_path / "imgs"
    _images(folder)
    bad = folder / "b" / "bad.jpg"
    if damage == "corrupt":
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    elif damage == "truncated":
        buffer = folder / "b" / "whole.jpg"
        Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, quality=90)
        bad.write_bytes(buffer.read_bytes()[:200])
        buffer.unlink()
    else:
        bad.write_bytes(b"")
    _fails(
        cli,
        2,
        "bad.jpg",
        "--on-bad-image skip",
        store=ready,
        args=["embed", "--dataset", f"folder:{folder}", "--name", damage, "--store", ready],
    )
    outcome = cli(
        "embed",
        "--dataset",
        f"folder:{folder}",
        "--name",
        f"skip-{damage}",
        "--on-bad-image",
        "skip",
        "--store",
        ready,
        "-q",
        "--json",
    )
    assert outcome.code == 0, outcome.err
    assert outcome.json()["rows"] == 6
    ((spec, skipped),) = outcome.json()["skipped"].items()  # pipelines see what was left out
    assert spec == f"folder:{folder}" and len(skipped) == 1 and skipped[0].endswith("bad.jpg")
    attrs = RunStore(str(ready)).group_attrs(f"embed/skip-{damage}")
    assert attrs["skipped_images"] == 1 and attrs["skipped_examples"][0].endswith("bad.jpg")


def test_a_failed_overwrite_leaves_every_file_the_store_held(ready, tiny, cli, tmp_path):
    """--overwrite deletes old results only for good: a run that then fails on bad input (a
    missing dataset after a model change, an impossible option, a corrupt image) puts back
    everything it had moved aside, the root record included, byte for byte."""
    other_model = [str(a) for a in tiny.extract_args(ready, weights=tiny.other_weights)]
    other_model[other_model.index("--dataset") + 1] = f"npz:{tmp_path / 'nope.npz'}"
    _fails(cli, 2, "nope.npz", store=ready, args=[*other_model, "--overwrite"])
    head = ["fit-head", "--lr", "-1", "--overwrite", "--store", ready]
    _fails(cli, 2, "--lr", store=ready, args=head)
    folder = tmp_path / "imgs"
    _images(folder)
    (folder / "b" / "bad.jpg").write_bytes(b"not a jpeg")
    embed = ["embed", "--dataset", f"folder:{folder}", "--name", "id", "--overwrite"]
    _fails(cli, 2, "bad.jpg", store=ready, args=[*embed, "--store", ready])
    assert not (ready / ".replaced").exists()
    assert cli("inspect", "--store", ready, "--json").json()["stages"]["head"]["complete"]


def test_a_failed_first_run_does_not_stand_in_the_way_of_the_corrected_one(tiny, cli, tmp_path):
    store = tmp_path / "run"
    args = [str(a) for a in tiny.extract_args(store)]
    bad = list(args)
    bad[bad.index("--weights") : bad.index("--weights") + 2] = []  # forgot --weights
    bad[bad.index("--dataset") + 1] = f"npz:{tmp_path / 'nope.npz'}"  # and mistyped the data
    _fails(cli, 2, "nope.npz", args=bad)
    assert cli(*args).code == 0  # the failed run recorded no model
    folder = tmp_path / "imgs"
    _images(folder)
    bad_image = folder / "b" / "bad.jpg"
    bad_image.write_bytes(b"not a jpeg")
    embed = ["embed", "--dataset", f"folder:{folder}", "--name", "f", "--store", store, "-q"]
    _fails(cli, 2, "bad.jpg", args=embed)
    bad_image.unlink()  # as the message advises
    assert cli(*embed).code == 0
    again = ["embed", "--dataset", f"folder:{folder}", "--name", "g", "--store", store, "-q"]
    assert cli(*again, "--batch-size", "-3").code == 2
    assert cli(*again).code == 0  # no batch size of -3 was recorded


def test_empty_dataset(ready, cli, tmp_path):
    (tmp_path / "nothing").mkdir()
    _fails(
        cli,
        2,
        "nothing",
        store=ready,
        args=["embed", "--dataset", f"folder:{tmp_path / 'nothing'}", "--store", ready],
    )


def test_images_of_mixed_sizes_and_channels_are_embedded(ready, cli, tmp_path):
    folder = tmp_path / "mixed"
    _images(folder, sizes=((8, 8), (13, 9), (32, 20)), modes=("RGB", "L", "RGBA"))
    outcome = cli(
        "embed",
        "--dataset",
        f"folder:{folder}",
        "--name",
        "mixed",
        "--store",
        ready,
        "-q",
        "--json",
    )
    assert outcome.code == 0, outcome.err
    assert RunStore(str(ready)).read("embed/mixed/feat").shape == (6, 8)


def test_npz_without_x_or_with_wrong_dtype(ready, cli, tmp_path):
    np.savez(tmp_path / "nox.npz", images=np.zeros((3, 8, 8, 3), np.uint8))
    _fails(
        cli,
        2,
        "x",
        store=ready,
        args=["embed", "--dataset", f"npz:{tmp_path / 'nox.npz'}", "--store", ready],
    )
    np.savez(tmp_path / "float.npz", x=np.zeros((3, 8, 8, 3), np.float32))
    _fails(
        cli,
        2,
        "uint8",
        store=ready,
        args=["embed", "--dataset", f"npz:{tmp_path / 'float.npz'}", "--store", ready],
    )
    np.save(tmp_path / "one.npy", np.zeros((3, 8, 8, 3), np.uint8))
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    for name, needle in (("one.npy", "single .npy array"), ("text.npz", "not a zip file")):
        embed = ["embed", "--dataset", f"npz:{tmp_path / name}", "--store", ready]
        _fails(cli, 2, needle, "np.savez", store=ready, args=embed)


def test_weights_that_do_not_match_the_architecture(tiny, cli, tmp_path):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pt")
    args = [str(a) for a in tiny.extract_args(tmp_path / "run", weights=tmp_path / "wrong.pt")]
    _fails(cli, 2, "conv.weight", args=args)


def test_model_without_linear_needs_feature_layer(tiny, cli, tmp_path):
    (tmp_path / "convonly.py").write_text(
        textwrap.dedent("""
        from torch import nn
        def make():
            return nn.Sequential(nn.Conv2d(3, 3, 8), nn.Flatten())
    """)
    )
    args = [
        "extract-subspace",
        "--model",
        f"{tmp_path / 'convonly.py'}:make",
        "--dataset",
        tiny.train,
        "--store",
        tmp_path / "run",
        *PREPROCESS,
    ]
    _fails(cli, 2, "--feature-layer", args=args)


def test_k_larger_than_parameters_or_samples(tiny, cli, tmp_path):
    args = [*tiny.extract_args(tmp_path / "run"), "--method", "pca", "--k", "500"]
    _fails(cli, 2, "--k 500", "rank", args=args)


def test_a_budget_too_small_names_what_each_command_offers(ready, tiny, cli, tmp_path):
    pca = [*tiny.extract_args(tmp_path / "run"), "--method", "pca", "--k", "2"]
    _fails(cli, 2, "(90 x 12, 8.44 KiB)", "budget's 1000 B", args=[*pca, "--memory-budget", "1000"])
    outcome = _fails(cli, 2, "lower --max-samples or --k", args=[*pca, "--memory-budget", "20K"])
    assert "--basis-dtype" not in outcome.err  # extract-subspace has no such option
    embed = ["embed", "--dataset", tiny.test, "--name", "b", "--store", ready]
    # embed needs no more than a few basis rows at a time: a tiny budget costs passes, not a refusal
    blocked = cli(*embed, "--memory-budget", "1K", "-q")
    assert blocked.code == 0, blocked.err
    whole = cli(*embed[:4], "c", *embed[5:], "-q")
    assert whole.code == 0, whole.err
    store = RunStore(str(ready))
    np.testing.assert_allclose(
        store.read("embed/b/grad"), store.read("embed/c/grad"), rtol=1e-5, atol=1e-6
    )


def test_fit_head_options_are_checked_before_anything_is_computed(ready, cli):
    for option, value, needle in (
        ("--head-batch-size", "1", "--head-batch-size must be at least 2"),
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--lr", "0", "--lr must be positive"),
        ("--knn-k", "0", "--knn-k must be at least 1"),
        ("--react-percentile", "0", "--react-percentile must be in (0, 100]"),
    ):
        args = ["fit-head", option, value, "--train", "npz:/nowhere.npz", "--store", ready]
        _fails(cli, 2, needle, store=ready, args=args)  # before the training set is looked at


def test_params_matching_nothing(tiny, cli, tmp_path):
    args = [*tiny.extract_args(tmp_path / "run"), "--params", "layer9.*"]
    _fails(cli, 2, "layer9.*", args=args)


def test_nan_in_logits_names_the_samples(tiny, cli, tmp_path):
    x = np.load(tiny.root / "test.npz")["x"].copy()
    np.savez(tmp_path / "ok.npz", x=x)
    (tmp_path / "nanny.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        class Nanny(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(3, 4)
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                m = x.mean(dim=(2, 3))
                # inputs whose red channel is saturated give NaN
                m = torch.where(m[:, :1] > 1.9, torch.full_like(m, float("nan")), m)
                return self.fc(torch.relu(self.fc1(m)))

        def make():
            torch.manual_seed(0)
            return Nanny()
    """)
    )
    x[[4, 9]] = 255  # two saturated images
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(len(x)) % 3)
    np.savez(
        tmp_path / "train.npz",
        x=np.load(tiny.root / "train.npz")["x"],
        y=np.load(tiny.root / "train.npz")["y"],
    )
    store = tmp_path / "run"
    args = [
        "extract-subspace",
        "--model",
        f"{tmp_path / 'nanny.py'}:make",
        "--dataset",
        f"npz:{tmp_path / 'train.npz'}",
        "--store",
        store,
        "-q",
        *PREPROCESS,
    ]
    assert cli(*args).code == 0
    outcome = _fails(
        cli,
        2,
        "NaN",
        "[4, 9]",
        store=store,
        args=["embed", "--dataset", f"npz:{tmp_path / 'bad.npz'}", "--store", store],
    )
    assert "logits" in outcome.err


def test_a_disk_that_fills_up(ready, tiny, cli, monkeypatch):
    import errno

    import zarr.storage._local as local

    original = local._put
    calls = {"n": 0}

    def fill_up(path, value, exclusive=False):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", fill_up)
    outcome = cli(
        "embed",
        "--dataset",
        tiny.train,
        "--name",
        "full",
        "--chunk-rows",
        "10",
        "--store",
        ready,
        "-q",
    )
    monkeypatch.setattr(local, "_put", original)
    assert outcome.code == 2 and "No space left on device" in outcome.err
    assert "Traceback" not in outcome.err and len(outcome.err.strip().splitlines()) == 1
    assert RunStore(str(ready)).stage_complete("embed/id")  # earlier results intact
    again = cli(
        "embed",
        "--dataset",
        tiny.train,
        "--name",
        "full",
        "--chunk-rows",
        "10",
        "--store",
        ready,
        "-q",
    )
    assert again.code == 0, again.err


def test_store_from_a_newer_format(tiny, cli, tmp_path):
    store = tmp_path / "future"
    RunStore(str(store)).update_root(format_version=FORMAT_VERSION + 1)
    _fails(
        cli,
        3,
        "newer",
        "upgrade gradcli",
        store=store,
        args=["embed", "--dataset", tiny.test, "--store", store],
    )


def test_fit_head_before_any_subspace_or_embedding(tmp_path, cli):
    _fails(cli, 2, "extract-subspace", args=["fit-head", "--store", tmp_path / "none"])


def test_unlabelled_training_set_for_the_head(ready, tiny, cli):
    _fails(cli, 2, "no labels", args=["fit-head", "--train", tiny.ood, "--store", ready])


def test_conflicting_or_impossible_options(ready, tiny, cli):
    args = [*tiny.extract_args(ready), "--method", "avg", "--k", "7"]
    _fails(cli, 2, "drop --k", store=ready, args=args)
    _fails(
        cli,
        2,
        "--embedding",
        store=ready,
        args=["score", "--dataset", "id", "--embedding", "sideways", "--store", ready],
    )
    labels_beyond = ready.parent / "beyond.npz"
    np.savez(labels_beyond, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 7]))
    head = ["fit-head", "--id-test", f"npz:{labels_beyond}", "--store", ready]
    _fails(cli, 2, "outside 0..2", store=ready, args=head)
    head = ["fit-head", "--clip-dims", "100", "--overwrite", "--store", ready]
    _fails(cli, 2, "--clip-dims 100 exceeds", store=ready, args=head)
    for alpha in ("nan", "inf"):
        score = ["score", "--dataset", "id", "--alpha", alpha, "--store", ready]
        _fails(cli, 2, "--alpha must be a finite number", store=ready, args=score)
    itself = ["evaluate", "--ood", "id", "--id", "id", "--method", "knn", "--store", ready]
    _fails(cli, 2, "is the ID test set 'id' itself", store=ready, args=itself)
    score = ["score", "--dataset", "id", "--method", "vim", "--embedding", "grad"]
    _fails(cli, 2, "vim scores feat", store=ready, args=[*score, "--store", ready])
    _fails(
        cli,
        2,
        "--react-percentile",
        store=ready,
        args=["fit-head", "--react-percentile", "0", "--store", ready],
    )
    _fails(
        cli,
        2,
        "--basis-dtype",
        store=ready,
        args=["embed", "--dataset", tiny.test, "--basis-dtype", "int8", "--store", ready],
    )
    _fails(
        cli,
        2,
        "--memory-budget",
        store=ready,
        args=["embed", "--dataset", tiny.test, "--memory-budget", "lots", "--store", ready],
    )


def test_command_line_mistakes_name_the_option_and_where_help_is(ready, cli):
    embed = ["embed", "--store", ready]
    _fails(cli, 2, "'--dataset'", "'gradcli embed --help'", store=ready, args=embed)
    _fails(
        cli, 2, "'--batch-size'", store=ready, args=[*embed, "--dataset", "id", "--batch-size", "x"]
    )
    _fails(cli, 2, "--nope", store=ready, args=[*embed, "--dataset", "id", "--nope"])
    _fails(
        cli,
        2,
        "--batch-size must be at least 1",
        store=ready,
        args=[*embed, "--dataset", "id", "--batch-size", "0"],
    )
    _fails(cli, 2, "'nosuch'", "'gradcli --help'", args=["nosuch"])


def test_devices_other_than_cpu_and_cuda_are_refused(ready, tiny, cli):
    embed = ["embed", "--dataset", tiny.test, "--name", "d", "--store", ready]
    for device in ("tpu", "meta", "cuda:x"):
        _fails(
            cli,
            2,
            f"'{device}'",
            "cpu, cuda or cuda:N",
            store=ready,
            args=[*embed, "--device", device],
        )
    extract = [str(a) for a in tiny.extract_args(ready)]
    _fails(cli, 2, "'tpu'", store=ready, args=[*extract, "--device", "tpu"])
    if not torch.cuda.is_available():
        _fails(cli, 2, "CUDA is not available", store=ready, args=[*embed, "--device", "cuda:1"])


def test_ctrl_c_before_the_stop_handler_is_installed_exits_130(ready, cli, monkeypatch):
    from gradcli.cli import common

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "open_run", interrupted)
    _fails(
        cli,
        130,
        "rerun the same command",
        store=ready,
        args=["embed", "--dataset", "id", "--store", ready],
    )


def test_a_model_file_changed_since_extraction_is_a_stale_store(tiny, cli, tmp_path):
    source = tmp_path / "net.py"
    source.write_text(MODEL_SOURCE)
    store = tmp_path / "run"
    args = [str(a) for a in tiny.extract_args(store)]
    args[args.index("--model") + 1] = f"{source}:make"
    args[args.index("--weights") : args.index("--weights") + 2] = []  # the factory's own init
    assert cli(*args).code == 0
    source.write_text(
        MODEL_SOURCE.replace(
            "Linear(16, 8), nn.ReLU(), nn.Linear(8,", "Linear(16, 9), nn.ReLU(), nn.Linear(9,"
        )
    )
    _fails(
        cli,
        3,
        "num_parameters",
        "--overwrite",
        store=store,
        args=["embed", "--dataset", tiny.test, "--store", store],
    )


def test_a_store_path_that_is_a_file_or_cannot_be_made(ready, tiny, cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a store")
    extract = [str(a) for a in tiny.extract_args(afile)]
    _fails(cli, 2, "is a file", "name a folder", args=extract)
    _fails(cli, 2, "is a file", args=["embed", "--dataset", tiny.test, "--store", afile])
    _fails(cli, 2, "cannot", "check --store", args=[str(a) for a in tiny.extract_args(afile / "x")])
    assert afile.read_text() == "not a store"
    evaluate = ["evaluate", "--ood", tiny.ood, "--results-dir", afile, "--store", ready]
    _fails(cli, 2, "--results-dir", "is a file", store=ready, args=evaluate)


def test_a_weights_file_gone_since_extraction_names_it(tiny, cli, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(tiny.weights.read_bytes())
    store = tmp_path / "run"
    assert cli(*tiny.extract_args(store, weights=weights)).code == 0
    weights.unlink()
    embed = ["embed", "--dataset", tiny.test, "--store", store]
    _fails(cli, 3, "w.pt", "is gone", "--overwrite", store=store, args=embed)


def test_a_damaged_store_names_the_array_and_the_command_that_rewrites_it(
    ready, tiny, cli, tmp_path
):
    import shutil

    embed = ["embed", "--dataset", tiny.ood, "--name", "o"]
    truncated = tmp_path / "truncated"
    shutil.copytree(ready, truncated)
    chunk = next(
        p
        for p in sorted((truncated / "subspace" / "basis").rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.write_bytes(chunk.read_bytes()[:7])
    _fails(
        cli,
        3,
        "subspace/basis",
        "damaged: rows 0-",
        "extract-subspace",
        args=[*embed, "--store", truncated],
    )
    missing = tmp_path / "missing"
    shutil.copytree(ready, missing)
    (missing / "stats" / "var" / "zarr.json").unlink()
    _fails(cli, 3, "stats/var", "is missing", args=[*embed, "--store", missing])


def test_embedding_names_and_a_chunk_larger_than_the_data(ready, tiny, cli):
    for name in ("zarr.json", "sp ace", "é", ".hidden"):
        embed = ["embed", "--dataset", tiny.test, "--name", name, "--store", ready]
        _fails(cli, 2, "not a valid name", store=ready, args=embed)
    big = ["embed", "--dataset", tiny.test, "--name", "big", "--chunk-rows", str(10**11)]
    assert cli(*big, "--store", ready, "-q").code == 0
    assert RunStore(str(ready)).shape("embed/big/done") == (1,)


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, tiny, cli):
    missing = ["embed", "--dataset", tiny.test, "--store", tmp_path / "none"]
    outcome = cli(*missing, "--debug")
    assert outcome.code == 2 and "Traceback" in outcome.err and "BadInputError" in outcome.err
    assert outcome.err.strip().splitlines()[-1].startswith("error: no run store")


def test_changed_data_params_or_k_are_stale_and_name_the_difference(tiny, cli, tmp_path):
    data = tmp_path / "train.npz"
    original = np.load(tiny.root / "train.npz")
    np.savez(data, x=original["x"], y=original["y"])
    store = tmp_path / "run"
    args = [str(a) for a in tiny.extract_args(store)]
    args[args.index("--dataset") + 1] = f"npz:{data}"
    assert cli(*args, "--method", "pca", "--k", "3").code == 0
    assert (
        cli("embed", "--dataset", f"npz:{data}", "--name", "train", "--store", store, "-q").code
        == 0
    )
    _fails(
        cli, 3, "k 3 -> 4", "--overwrite", store=store, args=[*args, "--method", "pca", "--k", "4"]
    )
    _fails(
        cli,
        3,
        "params",
        "--overwrite",
        store=store,
        args=[*args, "--method", "pca", "--k", "3", "--params", "5.*"],
    )
    changed = original["x"].copy()
    changed[0] = 255 - changed[0]
    np.savez(data, x=changed, y=original["y"])
    _fails(
        cli,
        3,
        "fingerprint",
        "--overwrite",
        store=store,
        args=["embed", "--dataset", f"npz:{data}", "--name", "train", "--store", store],
    )


def test_recomputing_upstream_invalidates_downstream(ready, tiny, cli, tmp_path):
    import shutil

    store = tmp_path / "copy"
    shutil.copytree(ready, store)
    assert RunStore(str(store)).stage_complete("head")
    outcome = cli(*tiny.extract_args(store, weights=tiny.other_weights), "--overwrite")
    assert outcome.code == 0, outcome.err
    after = RunStore(str(store))
    assert not after.has("embed") and not after.has("head") and not after.has("detectors")


def test_extract_options_are_refused_before_the_store_or_any_data_pass(tiny, cli, tmp_path):
    """Each invalid option of extract-subspace: one line, exit 2, no store made, and no
    statistics pass started (it would raise here)."""
    from gradcli.stages import stats as stats_stage

    def forbidden(*args, **kwargs):
        raise AssertionError("the statistics pass started")

    original = stats_stage.compute_statistics
    stats_stage.compute_statistics = forbidden
    try:
        pca = ["--method", "pca", "--k", "2"]
        for extra, needle in (
            ([*pca, "--iterations", "-1"], "--iterations must be at least 1, not -1"),
            ([*pca, "--oversample", "-2"], "--oversample must be at least 0, not -2"),
            ([*pca, "--checkpoint-every", "0"], "--checkpoint-every must be at least 1, not 0"),
            (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, not 0"),
            ([*pca, "--iteration-dtype", "fp8"], "--iteration-dtype must be auto"),
            (["--method", "pca"], "--method pca needs --k"),
            (["--method", "pca", "--k", "0"], "--k must be at least 1"),
            (["--method", "svd"], "unknown --method 'svd'"),
            (["--max-samples", "0"], "--max-samples must be at least 1, not 0"),
            (["--batch-size", "0"], "--batch-size"),
            (["--seed", "-3"], "--seed"),
        ):
            store = tmp_path / "run"
            _fails(cli, 2, needle, args=[*tiny.extract_args(store), *extra])
            assert not store.exists(), extra  # refused before the store was made
        # Checked once the model and data are known, still before the statistics pass.
        for extra, needle in (
            (
                ["--k", "7"],
                "--method avg gives K = C - 1 = 2 (centred class means); drop --k "
                "or use --method pca --k 7",
            ),
            (["--k", "3"], "--method pca --k 3"),
            ([*pca, "--memory-budget", "1000"], "(90 x 12, 8.44 KiB)"),
            (["--memory-budget", "4K"], "--method avg on 283 parameters (3 classes) needs"),
            (["--max-samples", "2"], "have no training samples in npz:"),
        ):
            store = tmp_path / "model-known"
            _fails(cli, 2, needle, args=[*tiny.extract_args(store), *extra])
            assert not RunStore(str(store)).has("stats")
    finally:
        stats_stage.compute_statistics = original


def test_extract_summary_says_average_gradient_k_is_c_minus_1(tiny, cli, tmp_path):
    args = [*tiny.extract_args(tmp_path / "run"), "--k", "2", "--batch-size", "16"]
    text = cli(*args)
    assert text.code == 0, text.err
    assert "subspace avg K=2" in text.out
    assert "K = C - 1 = 2: the 3 class means are centred on the training mean" in text.out
    summary = cli(*args, "--json").json()
    assert summary["k"] == 2 and summary["classes"] == 3 and summary["reused"]
    assert summary["k_reason"].startswith("K = C - 1 = 2: the 3 class means are centred")
