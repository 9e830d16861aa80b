"""Beyond one machine: sharded embeds, torchrun reductions, stores at fsspec URLs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradcli.distributed import parse_shard, shard_from_env, shard_range, torchrun_shard
from gradcli.errors import BadInputError
from gradcli.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MY_ID": "1", "MY_N": "2"}
KEYS = ("grad", "gnorm", "feat", "logits", "labels")


def _one_line_error(outcome, code: int, *needles: str) -> None:
    assert outcome.code == code, (outcome.code, outcome.err)
    lines = [line for line in outcome.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, outcome.err
    for needle in needles:
        assert needle in outcome.err, (needle, outcome.err)


@pytest.fixture(scope="module")
def extracted(tiny, tmp_path_factory) -> Path:
    """A store holding the tiny model's AG subspace (copied by each test)."""
    from gradcli.cli import main

    store = tmp_path_factory.mktemp("cluster") / "base"
    assert main([str(a) for a in tiny.extract_args(store)]) == 0
    return store


def _copy(extracted: Path, target: Path) -> Path:
    shutil.copytree(extracted, target)
    return target


def _embed_args(tiny, store: Path, name: str, *extra: str) -> list[str]:
    args = ["embed", "--dataset", tiny.test, "--name", name, "--chunk-rows", "8"]
    return [*args, "--batch-size", "4", "--store", str(store), "-q", *extra]


def _arrays(store: Path, name: str) -> dict[str, np.ndarray]:
    run = RunStore(str(store))
    return {key: run.read(f"embed/{name}/{key}") for key in KEYS}


def test_shard_arithmetic_covers_every_chunk_once():
    for n_chunks in (0, 1, 5, 6, 17):
        for count in (1, 2, 3, 8):
            ranges = [shard_range(n_chunks, i, count) for i in range(count)]
            assert [c for r in ranges for c in r] == list(range(n_chunks))
    assert parse_shard("2/3") == (2, 3)
    assert shard_from_env(None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}) == (
        1,
        4,
    )
    assert shard_from_env("A,B", {"A": "0", "B": "1"}) == (0, 1)
    assert torchrun_shard({"WORLD_SIZE": "2", "RANK": "1"}) == (1, 2)
    assert torchrun_shard({"WORLD_SIZE": "1", "RANK": "0"}) is None and torchrun_shard({}) is None


@pytest.mark.parametrize("budget", [None, "3500"])
def test_concurrent_shards_equal_one_process_bitwise(tiny, extracted, tmp_path, budget):
    """Two shard processes started at once on one store (with and without parameter row
    blocks from a small memory budget) give the single-process arrays bit for bit."""
    extra = ["--memory-budget", budget] if budget else []
    single, sharded = _copy(extracted, tmp_path / "single"), _copy(extracted, tmp_path / "sh")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gradcli", *_embed_args(tiny, sharded, "t", *extra), *shard],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # the second process takes its shard (1/2) from the environment
        for shard in (["--shard", "0/2"], ["--shard-from-env", "MY_ID,MY_N"])
    ]
    from gradcli.cli import main

    assert main(_embed_args(tiny, single, "t", *extra)) == 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert RunStore(str(sharded)).stage_complete("embed/t")
    a, b = _arrays(single, "t"), _arrays(sharded, "t")
    for key in KEYS:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key])
    leftovers = RunStore(str(sharded)).children("embed/t")
    assert "block_done" not in leftovers and "partial0" not in leftovers


def test_one_shard_then_the_other_completes_and_inspect_shows_it(tiny, extracted, tmp_path, cli):
    store = _copy(extracted, tmp_path / "s")
    first = cli(*_embed_args(tiny, store, "t", "--shard", "1/2", "--json"))
    assert first.code == 0, first.err
    summary = first.json()
    assert summary["complete"] is False and summary["chunks_done"] == 3  # 6 chunks of 8 rows
    report = cli("inspect", "--store", store, "--json", "-q").json()
    info = report["embeddings"]["t"]
    assert info["chunks_done"] == "3/6" and info["complete"] is False
    assert info["shards"] == {"count": 2, "complete": [1], "pending": {"0": [0, 1, 2]}}
    table = cli("inspect", "--store", store, "-q")
    assert "shards done 1/2" in table.out
    # the failed shard 0 is rerun: the store completes
    assert cli(*_embed_args(tiny, store, "t", "--shard", "0/2")).code == 0
    single = _copy(extracted, tmp_path / "single")
    assert cli(*_embed_args(tiny, single, "t")).code == 0
    a, b = _arrays(single, "t"), _arrays(store, "t")
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert RunStore(str(store)).stage_complete("embed/t")


def test_plain_rerun_finalises_a_sharded_store(tiny, extracted, tmp_path, cli):
    store = _copy(extracted, tmp_path / "s")
    for shard in ("0/2", "1/2"):
        assert cli(*_embed_args(tiny, store, "t", "--shard", shard)).code == 0
    run = RunStore(str(store))
    run.set_attrs("embed/t", complete=False)  # as if the last shard died before completing
    assert cli(*_embed_args(tiny, store, "t")).code == 0
    assert RunStore(str(store)).stage_complete("embed/t")


def test_bad_shards_are_one_line_errors(tiny, extracted, tmp_path, cli, monkeypatch):
    store = _copy(extracted, tmp_path / "s")
    for bad, needle in (
        ("2/2", "outside 0..1"),
        ("1/0", "at least 1"),
        ("a/b", "I/N"),
        ("3", "I/N"),
        ("-1/2", "outside"),
    ):
        _one_line_error(cli(*_embed_args(tiny, store, "t", "--shard", bad)), 2, needle)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    _one_line_error(
        cli(*_embed_args(tiny, store, "t", "--shard-from-env", "slurm")),
        2,
        "SLURM_ARRAY_TASK_ID is not set",
    )
    monkeypatch.setenv("MY_ID", "0")
    monkeypatch.delenv("MY_COUNT", raising=False)
    _one_line_error(
        cli(*_embed_args(tiny, store, "t", "--shard-from-env", "MY_ID,MY_COUNT")),
        2,
        "MY_COUNT is not set",
    )
    _one_line_error(
        cli(*_embed_args(tiny, store, "t", "--shard", "0/2", "--overwrite")), 2, "--overwrite"
    )
    with pytest.raises(BadInputError, match="not an integer"):
        shard_from_env("A,B", {"A": "x", "B": "2"})
    assert not RunStore(str(store)).has("embed/t")  # nothing written by a refused command


# -- torchrun -------------------------------------------------------------------------------
PCA = ["--method", "pca", "--k", "4", "--iterations", "2", "--checkpoint-every", "2"]


def _extract_cmd(tiny, store: Path, *extra: str) -> list[str]:
    return [*map(str, tiny.extract_args(store)), "--batch-size", "8", *extra]


def _assert_same_subspace(single: RunStore, dist: RunStore, pca: bool) -> None:
    """Equal within float32 summation order: statistics to 1e-5 relative, AG basis to 1e-5,
    PCA eigenvalues to 1e-4 relative, captured variance within 1e-4, and the same top-K
    subspace (|cos| of matching basis vectors within 1e-4 of 1). AG class means are equal bit
    for bit: each class is computed whole, by one rank, in the batches of one process."""
    for path in ("stats/mean", "stats/var"):
        a, b = single.read(path), dist.read(path)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    if not pca:
        np.testing.assert_array_equal(
            dist.read("stats/class_means"), single.read("stats/class_means")
        )
    assert dist.group_attrs("stats")["samples"] == single.group_attrs("stats")["samples"]
    if not pca:  # PCA's statistics hold no class sums
        counts = dist.group_attrs("stats")["class_counts"]
        assert counts == single.group_attrs("stats")["class_counts"]
    assert not dist.has("stats/state")
    a, b = single.read("subspace/basis"), dist.read("subspace/basis")
    if not pca:
        np.testing.assert_allclose(b, a, atol=1e-5)
        return
    va, vb = single.read("subspace/eigenvalues"), dist.read("subspace/eigenvalues")
    np.testing.assert_allclose(vb, va, rtol=1e-4)
    total = single.group_attrs("subspace")["total_variance"]
    assert abs(va.sum() / total - vb.sum() / total) < 1e-4
    np.testing.assert_allclose(np.abs((a * b).sum(axis=0)), 1.0, atol=1e-4)


def test_torchrun_two_processes_equal_one_process(tiny, tmp_path):
    """`python -m torch.distributed.run --nproc-per-node 2 -m gradcli extract-subspace` (gloo
    on CPU) against the same command in one process, for PCA and AG."""
    from gradcli.cli import main

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--standalone", "-m", "gradcli"]  # a free local port for each job
    procs = {
        method: subprocess.Popen(
            [*launch, *_extract_cmd(tiny, tmp_path / f"dist-{method}", *extra)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # the launcher and its workers, to end together
        )
        for method, extra in (("pca", PCA), ("avg", []))
    }
    try:
        for method, extra in (("pca", PCA), ("avg", [])):
            assert main(_extract_cmd(tiny, tmp_path / f"single-{method}", *extra)) == 0
        outputs = {method: proc.communicate(timeout=120) for method, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for method, proc in procs.items():
        out, err = outputs[method]
        assert proc.returncode == 0, err.decode()[-2000:]
        assert out.decode().count("subspace") == 1  # rank 0 alone reports
        single = RunStore(str(tmp_path / f"single-{method}"))
        dist = RunStore(str(tmp_path / f"dist-{method}"))
        assert dist.stage_complete("subspace") and not dist.has("subspace/state")
        _assert_same_subspace(single, dist, method == "pca")


def _rank(
    rank: int, world: int, port: int, store: str, tiny, stop_at: int | None, method: str
) -> None:
    """One rank of a job started as torchrun would (its env), stopping on request."""
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    from gradcli.distributed import from_env
    from gradcli.errors import Interrupted
    from gradcli.run import Run

    torch.set_num_threads(1)
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return stop_at is not None and calls["n"] >= stop_at and rank == 1  # one rank asks

    group = from_env("cpu")
    try:
        run = Run(store, group=group, should_stop=should_stop)
        run.set_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
        options = {"method": "pca", "k": 4, "iterations": 2} if method == "pca" else {}
        with contextlib.suppress(Interrupted):
            run.extract_subspace(tiny.train, checkpoint_every=2, batch_size=8, **options)
    finally:
        group.close()


def _spawn(world: int, store: Path, tiny, stop_at: int | None = None, method: str = "pca") -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (world, port, str(store), tiny, stop_at, method)
    mp.spawn(_rank, args=args, nprocs=world, join=True)


def test_distributed_pca_interrupted_resumes_with_two_or_one_processes(tiny, tmp_path, cli):
    """A stop asked on one rank only stops both (no deadlock) with a checkpoint of the
    all-reduced partial sums; resuming with 2 ranks, or with 1 process (which redoes that
    iteration from its stored block), equals the uninterrupted single-process run."""
    # stats: 6 steps of 8 rows per rank (45 rows each), PCA: 6 steps per pass; call 15 is
    # the third batch of the second iteration
    _spawn(2, tmp_path / "two", tiny, stop_at=15)
    stopped = RunStore(str(tmp_path / "two"))
    assert not stopped.stage_complete("subspace")
    state = stopped.group_attrs("subspace/state")
    assert (state["iteration"], state["cursor"], state["world"]) == (1, 3, 2)
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    _spawn(2, tmp_path / "two", tiny)
    assert cli(*_extract_cmd(tiny, tmp_path / "one", *PCA)).code == 0
    assert cli(*_extract_cmd(tiny, tmp_path / "single", *PCA)).code == 0
    single = RunStore(str(tmp_path / "single"))
    for label in ("two", "one"):
        resumed = RunStore(str(tmp_path / label))
        assert resumed.stage_complete("subspace")
        _assert_same_subspace(single, resumed, pca=True)


def test_distributed_average_gradient_splits_classes_and_resumes_with_two_or_one(
    tiny, tmp_path, cli
):
    """AG under 2 ranks: 3 classes of 30 in 4 batches of 8 each; rank 0 takes classes 0 and 1
    (8 steps), rank 1 class 2 (4 steps). A stop asked on rank 1 at step 5 saves the classes
    both ranks finished (0 and 2, their rows written by each rank); resuming with 2 ranks, or
    with 1 process, computes class 1 alone and equals the uninterrupted single process."""
    _spawn(2, tmp_path / "two", tiny, stop_at=5, method="avg")
    stopped = RunStore(str(tmp_path / "two"))
    assert not stopped.stage_complete("stats")
    state = stopped.group_attrs("stats/state")
    assert state["done"] == [0, 2] and state["count"] == 60
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    assert cli(*_extract_cmd(tiny, tmp_path / "single")).code == 0
    single = RunStore(str(tmp_path / "single"))
    rows = stopped.read("stats/class_means")
    np.testing.assert_array_equal(rows[[0, 2]], single.read("stats/class_means")[[0, 2]])
    _spawn(2, tmp_path / "two", tiny, method="avg")
    assert cli(*_extract_cmd(tiny, tmp_path / "one")).code == 0
    for label in ("two", "one"):
        resumed = RunStore(str(tmp_path / label))
        assert resumed.stage_complete("subspace")
        _assert_same_subspace(single, resumed, pca=False)


# -- stores at fsspec URLs ------------------------------------------------------------------
def _pipeline(run, tiny) -> dict[str, np.ndarray]:
    run.set_model(tiny.model, str(tiny.weights), input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    run.extract_subspace(tiny.train, method="pca", k=3, iterations=1, batch_size=16)
    run.embed(tiny.test, name="t", batch_size=8, chunk_rows=16)
    run.embed(tiny.test, name="s", batch_size=8, chunk_rows=16, shard=(1, 2))
    run.embed(tiny.test, name="s", batch_size=8, chunk_rows=16, shard=(0, 2))
    results = run.evaluate([tiny.ood], id_dataset="t", methods=["energy", "knn"])
    out = {
        f"{m}-{e}-auroc": np.array(r[o]["auroc"])
        for (m, e), r in results.rows.items()
        for o in results.ood_names
    }
    for key in KEYS:
        out[f"t/{key}"] = run.load_embedding("t")[key]
        out[f"s/{key}"] = run.load_embedding("s")[key]
    out["basis"] = run.store.read("subspace/basis")
    return out


def test_memory_url_store_equals_a_local_store(tiny, tmp_path):
    """The whole pipeline (with a sharded embed) on memory:// gives the local store's arrays."""
    from gradcli.run import Run

    local = _pipeline(Run(tmp_path / "local", memory_budget=1 << 30), tiny)
    url = f"memory://gradcli-test/{tmp_path.name}"  # one in-memory filesystem per process
    remote_run = Run(url, memory_budget=1 << 30)
    remote = _pipeline(remote_run, tiny)
    assert remote_run.store.stage_complete("embed/s")
    assert not (tmp_path / "memory:").exists() and not Path("memory:").exists()
    assert local.keys() == remote.keys()
    for key in local:
        np.testing.assert_array_equal(remote[key], local[key], err_msg=key)
    np.testing.assert_array_equal(remote["s/grad"], remote["t/grad"])
    reopened = Run(url, create=False)
    assert reopened.store.stage_complete("head")


def test_file_url_store_through_the_cli(tiny, tmp_path, cli):
    url = f"file://{tmp_path / 'viaurl'}"
    for store in (url, tmp_path / "plain"):
        args = [*tiny.extract_args(store)]
        assert cli(*args).code == 0
        outcome = cli(*_embed_args(tiny, store, "t", "--shard", "0/1", "--json"))
        assert outcome.code == 0, outcome.err
        assert outcome.json()["complete"] is True
    assert (tmp_path / "viaurl" / "embed" / "t" / "done").is_dir()  # a plain Zarr folder
    a, b = _arrays(tmp_path / "plain", "t"), _arrays(tmp_path / "viaurl", "t")
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    report = cli("inspect", "--store", url, "--json", "-q")
    assert report.code == 0 and report.json()["embeddings"]["t"]["chunks_done"] == "6/6"
    # evaluate writes its results into the URL store itself, not the working directory
    here = set(Path.cwd().iterdir())
    assert cli("fit-head", "--id-test", "t", "--knn-k", "5", "--store", url, "-q").code == 0
    outcome = cli("evaluate", "--ood", tiny.ood, "--id", "t", "--store", url, "-q", "--json")
    assert outcome.code == 0, outcome.err
    written = json.loads((tmp_path / "viaurl" / "results.json").read_text())
    assert written["results"] == outcome.json()["results"]
    assert (tmp_path / "viaurl" / "results.csv").read_text().startswith("method,embedding")
    assert set(Path.cwd().iterdir()) == here


# -- sharded score --------------------------------------------------------------------------
def test_sharded_odin_score_equals_unsharded(tiny, extracted, tmp_path, cli):
    """odin's model pass split over 2 shards (run one after the other; the second finds
    every chunk done and writes all scores) gives the unsharded scores bit for bit."""
    base = _copy(extracted, tmp_path / "base")
    assert cli(*_embed_args(tiny, base, "id")).code == 0
    assert cli("fit-head", "--train", tiny.train, "--knn-k", "5", "--store", base, "-q").code == 0
    assert cli("embed", "--dataset", tiny.ood, "--name", "ood", "--store", base, "-q").code == 0
    sharded, single = _copy(base, tmp_path / "sharded"), _copy(base, tmp_path / "single")
    score = ["score", "--dataset", "ood", "--method", "odin,energy", "--batch-size", "4"]
    first = cli(*score, "--store", sharded, "--shard", "1/2", "--json", "-q")
    assert first.code == 0, first.err
    document = first.json()
    assert document.pop("preprocess")["input_size"] == [8, 8]
    assert document == {"shard": "1/2", "complete": False, "scores": {}}
    assert not RunStore(str(sharded)).has("scores/ood")
    assert cli(*score, "--store", sharded, "--shard", "0/2", "-q").code == 0
    assert cli(*score, "--store", single, "-q").code == 0
    a, b = RunStore(str(single)), RunStore(str(sharded))
    assert sorted(a.children("scores/ood")) == sorted(b.children("scores/ood"))
    assert "odin-feat" in a.children("scores/ood")
    for key in a.children("scores/ood"):
        np.testing.assert_array_equal(b.read(f"scores/ood/{key}"), a.read(f"scores/ood/{key}"))
    assert not b.has("scores_parts/ood")
    # without odin there is no model pass to split; a dataset not embedded yet is refused
    _one_line_error(cli("score", "--dataset", "ood", "--shard", "0/2", "--store", base), 2, "odin")
    _one_line_error(
        cli("score", "--dataset", tiny.test, "--method", "odin", "--shard", "0/2", "--store", base),
        2,
        "finished embedding",
    )
