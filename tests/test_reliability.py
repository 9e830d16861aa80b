"""Crash safety: SIGKILL at many random points, then rerun, gives the arrays of a clean run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradcli.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: the harness runs several processes and OpenMP spins badly when
# cores are oversubscribed.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _gradcli(*args) -> list[str]:
    return [sys.executable, "-m", "gradcli", *map(str, args), "-q"]


def _run(args) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, env=ENV, capture_output=True)
    return time.perf_counter() - start


def _arrays(store: Path, paths) -> dict[str, np.ndarray]:
    run = RunStore(str(store))
    return {p: run.read(p) for p in paths}


def _kill_until(command, store: Path, seconds: float, rng: random.Random, kills: int) -> int:
    """SIGKILL reruns of ``command`` at random times until ``kills`` landed mid-run."""
    landed = attempts = 0
    while landed < kills and attempts < 4 * kills:
        attempts += 1
        proc = subprocess.Popen(
            [*command, "--store", str(store)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(0.2, seconds))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            landed += 1
            continue
        assert proc.returncode == 0
        shutil.rmtree(store)  # finished before the kill: start the store over
        prepare = getattr(command, "prepare", None)
        if prepare:
            prepare(store)
    return landed


class Command(list):
    """An argument list with an optional step that re-creates what the command needs."""

    prepare = None


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("big")
    labels = np.arange(6000) % 3
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=float)
    x = colours[labels][:, None, None, :] + rng.normal(0, 40, size=(6000, 8, 8, 3))
    np.savez(root / "train.npz", x=np.clip(x, 0, 255).astype(np.uint8), y=labels)
    return root / "train.npz"


def _extract(tiny, data, *extra) -> list[str]:
    """extract-subspace of the tiny model on ``data``, without --store."""
    args = [str(a) for a in tiny.extract_args(Path("unused"))]
    at = args.index("--store")
    args = args[:at] + args[at + 2 :]
    args[args.index("--dataset") + 1] = f"npz:{data}"
    return _gradcli(*args, "--batch-size", "50", *extra)


@pytest.mark.parametrize(
    "method", [["--method", "avg"], ["--method", "pca", "--k", "3", "--checkpoint-every", "5"]]
)
def test_extract_subspace_survives_sigkill_at_ten_points(method, tiny, big, tmp_path):
    command = Command(_extract(tiny, big, *method))
    clean = tmp_path / "clean"
    seconds = _run([*command, "--store", str(clean)])
    killed = tmp_path / "killed"
    landed = _kill_until(command, killed, seconds, random.Random(7), kills=10)
    assert landed >= 10
    _run([*command, "--store", str(killed)])
    paths = ["stats/mean", "stats/var", "subspace/basis"]
    if "pca" in method:
        paths.append("subspace/eigenvalues")
    want, got = _arrays(clean, paths), _arrays(killed, paths)
    for path in paths:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    assert not RunStore(str(killed)).has("subspace/state")


def test_embed_survives_sigkill_at_ten_points(tiny, big, tmp_path):
    base = tmp_path / "base"
    _run([*_extract(tiny, big), "--store", str(base)])
    embed = Command(
        _gradcli(
            "embed",
            "--dataset",
            f"npz:{big}",
            "--name",
            "big",
            "--chunk-rows",
            "200",
            "--batch-size",
            "50",
        )
    )
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    shutil.copytree(base, clean)
    seconds = _run([*embed, "--store", str(clean)])
    shutil.copytree(base, killed)
    embed.prepare = lambda store: shutil.copytree(base, store)
    landed = _kill_until(embed, killed, seconds + 1.0, random.Random(11), kills=10)
    assert landed >= 10
    _run([*embed, "--store", str(killed)])
    keys = [f"embed/big/{k}" for k in ("grad", "gnorm", "feat", "logits", "labels", "done")]
    want, got = _arrays(clean, keys), _arrays(killed, keys)
    for key in keys:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_sigterm_stops_at_a_chunk_boundary_and_resumes(tiny, big, tmp_path):
    store = tmp_path / "run"
    _run([*_extract(tiny, big), "--store", str(store)])
    embed = _gradcli(
        "embed",
        "--dataset",
        f"npz:{big}",
        "--name",
        "big",
        "--chunk-rows",
        "200",
        "--batch-size",
        "50",
        "--store",
        store,
    )
    proc = subprocess.Popen(
        embed, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    done = store / "embed" / "big" / "done" / "c"
    deadline = time.time() + 60
    while time.time() < deadline and not (done.exists() and len(os.listdir(done)) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # stderr is no terminal here: no acknowledgement line
    assert lines[0].startswith("interrupted:") and "rerun the same command" in lines[0]
    assert "Traceback" not in err
    flags = RunStore(str(store)).read("embed/big/done")
    assert 0 < flags.sum() < len(flags)
    _run(embed)
    assert RunStore(str(store)).read("embed/big/done").all()


# -- a store's first command, damaged chunks, read-only stores, results files ----------


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        out[str(path.relative_to(folder))] = (
            stat.st_size if path.is_file() else 0,
            stat.st_mtime_ns,
        )
    return out


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A store taken through evaluate on two OOD sets: everything a reading command needs."""
    from gradcli.cli import main

    root = tmp_path_factory.mktemp("finished")
    rng = np.random.default_rng(7)
    np.savez(root / "ood2.npz", x=rng.integers(0, 60, size=(20, 8, 8, 3)).astype(np.uint8))
    store = root / "run"
    steps = [
        tiny.extract_args(store),
        ["embed", "--dataset", tiny.test, "--name", "id", "--store", store, "-q"],
        ["fit-head", "--knn-k", "5", "--id-test", "id", "--store", store, "-q"],
        ["evaluate", "--ood", tiny.ood, "--ood", f"npz:{root / 'ood2.npz'}", "--id", "id"]
        + ["--store", store, "-q"],
    ]
    for args in steps:
        assert main([str(a) for a in args]) == 0, args
    return store, f"npz:{root / 'ood2.npz'}"


def _copy(finished, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(finished[0], target)
    return target


def test_a_failed_first_command_leaves_no_store(tiny, cli, tmp_path):
    from gradcli.errors import BadInputError
    from gradcli.run import Run

    new = tmp_path / "new" / "deeper" / "run"
    args = [str(a) for a in tiny.extract_args(new)]
    bad_weights = list(args)
    bad_weights[bad_weights.index("--weights") + 1] = str(tmp_path / "absent.pt")
    outcome = cli(*bad_weights)
    assert outcome.code == 2 and "absent.pt" in outcome.err
    assert not (tmp_path / "new").exists()
    outcome = cli(*args, "--k", "7")  # found after the model is recorded: still nothing left
    assert outcome.code == 2 and "--k" in outcome.err
    assert not (tmp_path / "new").exists()
    assert cli(*args).code == 0 and (new / "subspace").is_dir()  # the corrected command works

    missing = tmp_path / "no" / "such"
    run = Run(missing)
    for call in (
        lambda: run.score(tiny.ood),
        lambda: run.evaluate([tiny.ood]),
        lambda: run.load_embedding("id"),
    ):
        with pytest.raises(BadInputError, match=rf"no run store at {missing}.*extract-subspace"):
            call()
    assert not (tmp_path / "no").exists()


def _flip(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    for at in range(4, len(data) - 4, 7):
        data[at] ^= 0x5A
    chunk.write_bytes(bytes(data))


def test_a_damaged_chunk_is_named_with_its_rows_and_fix(finished, tiny, cli, tmp_path):
    store = _copy(finished, tmp_path)
    _, ood2 = finished
    chunk = store / "embed" / "id" / "grad" / "c" / "0" / "0"
    assert chunk.is_file()
    _flip(chunk)
    n = RunStore(str(store)).shape("embed/id/grad")[0]
    evaluate = cli("evaluate", "--ood", tiny.ood, "--id", "id", "--store", store, "-q")
    score = cli("score", "--dataset", "id", "--store", store, "-q")
    for outcome in (evaluate, score):
        assert outcome.code == 3, outcome.err
        lines = outcome.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in outcome.err
        assert "embed/id/grad" in outcome.err and f"rows 0-{n - 1}" in outcome.err
        assert f"gradcli embed --overwrite --name id --dataset {tiny.test}" in outcome.err
    shown = cli("inspect", "--store", store)
    assert shown.code == 0
    assert "damaged: embed/id/grad" in shown.out and "stages" in shown.out
    report = cli("inspect", "--store", store, "--json").json()
    assert [d["array"] for d in report["damaged"]] == ["embed/id/grad"]
    assert report["damaged"][0]["rows"] == [[0, n]]
    assert report["embeddings"]["id"]["damaged"]  # no reconstruction error from garbage
    good = [name for name in report["embeddings"] if name != "id"]
    assert good and all("reconstruction_error" in report["embeddings"][g] for g in good)
    assert report["stages"]["subspace"]["complete"] and report["id_train"]


def test_a_read_only_store_is_read_without_a_write(finished, tiny, cli, tmp_path, monkeypatch):
    import gradcli.store.runstore as store_mod
    from gradcli.errors import BadInputError
    from gradcli.run import Run

    store = _copy(finished, tmp_path)
    _, ood2 = finished
    writable = store_mod.is_writable
    assert writable(store)
    calls = []
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode, **kw: calls.append(p) or (mode != os.W_OK and real_access(p, mode)),
    )
    assert not writable(store) and RunStore(str(store)).read_only  # what the detection sees
    monkeypatch.setattr(os, "access", real_access)
    monkeypatch.setattr(store_mod, "is_writable", lambda folder: False)
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)  # root ignores it: patched
    before = _tree(store)
    results = tmp_path / "results"
    outcome = cli(
        "evaluate",
        "--ood",
        tiny.ood,
        "--ood",
        ood2,
        "--id",
        "id",
        "--store",
        store,
        "--results-dir",
        results,
        "--json",
    )
    assert outcome.code == 0, outcome.err
    document = outcome.json()
    assert document["written"] == [str(results / "results.json"), str(results / "results.csv")]
    plain = cli("evaluate", "--ood", tiny.ood, "--id", "id", "--store", store)
    assert plain.code == 0 and "read-only: results not saved" in plain.err
    assert cli("score", "--dataset", tiny.ood, "--store", store, "--json").code == 0
    assert cli("inspect", "--store", store, "--json").code == 0
    run = Run(store)
    assert run.store.read_only
    scores = run.score(tiny.ood, methods=["msp"], embeddings=["feat", "grad"])
    stored = RunStore(str(store))
    ood_name = run.stored_name(tiny.ood)
    np.testing.assert_array_equal(scores["msp-grad"], stored.read(f"scores/{ood_name}/msp-grad"))
    assert run.load_embedding("id")["grad"].shape[0] == 45
    assert _tree(store) == before  # not a byte, not a timestamp changed

    fresh = tmp_path / "fresh.npz"
    np.savez(fresh, x=np.full((6, 8, 8, 3), 128, dtype=np.uint8))
    needs = cli("evaluate", "--ood", f"npz:{fresh}", "--id", "id", "--store", store)
    assert needs.code == 2 and len(needs.err.strip().splitlines()) == 1
    assert "read-only" in needs.err and "writable copy" in needs.err and "fresh" in needs.err
    with pytest.raises(BadInputError, match="read-only"):
        run.embed(f"npz:{fresh}")
    assert _tree(store) == before
    subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)


def test_results_files_merge_by_ood_set(finished, tiny, cli, tmp_path):
    import json

    store = _copy(finished, tmp_path)
    _, ood2 = finished
    base = ["--id", "id", "--store", store, "--json", "-q"]
    first = cli("evaluate", "--ood", tiny.ood, "--ood", ood2, *base)
    assert first.code == 0
    second = cli("evaluate", "--ood", ood2, *base)  # fewer sets, same settings: merged
    assert second.code == 0
    assert second.json()["written"] == [str(store / "results.json"), str(store / "results.csv")]
    saved = json.loads((store / "results.json").read_text())

    def rows(document):
        return {(r["method"], r["embedding"], r["ood"]): r for r in document["results"]}

    old, new, merged = rows(first.json()), rows(second.json()), rows(saved)
    ood_name, ood2_name = first.json()["ood"]
    assert second.json()["ood"] == [ood2_name]
    assert saved["ood"] == [ood_name, ood2_name]
    pairs = {key[:2] for key in old}
    assert {key[:2] for key in merged} == pairs
    for method, emb in pairs:
        assert merged[(method, emb, ood_name)] == old[(method, emb, ood_name)]
        assert merged[(method, emb, ood2_name)] == new[(method, emb, ood2_name)]
        for metric in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            expected = (
                old[(method, emb, ood_name)][metric] + new[(method, emb, ood2_name)][metric]
            ) / 2
            assert merged[(method, emb, "average")][metric] == pytest.approx(expected)
    csv_lines = (store / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(saved["results"])
    text = cli("evaluate", "--ood", ood2, "--id", "id", "--store", store)
    assert text.code == 0 and f"results written to {store / 'results.json'}" in text.err
    # Another α scores the ensemble otherwise: its results replace the file, never mix in.
    third = cli("evaluate", "--ood", ood2, "--alpha", "0.25", *base)
    assert third.code == 0
    replaced = json.loads((store / "results.json").read_text())
    assert replaced["ood"] == [ood2_name] and replaced["settings"]["alpha"] == 0.25
    assert rows(replaced) == rows(third.json())
