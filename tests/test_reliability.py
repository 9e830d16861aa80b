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
