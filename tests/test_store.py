"""Run store: stage provenance, row chunks with done markers, bytes, format version."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gradcli.errors import BadInputError, Interrupted, StaleStoreError
from gradcli.store import FORMAT_VERSION, RunStore, digest_of


def test_open_stage_reuses_matching_and_rejects_other_provenance(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    assert store.open_stage("stats", {"model": "a", "k": 10}) is False
    store.write("stats/mean", np.arange(5, dtype=np.float32))
    store.complete_stage("stats", samples=5)
    reopened = RunStore(str(tmp_path / "run"))
    assert reopened.open_stage("stats", {"k": 10, "model": "a"}) is True
    with pytest.raises(StaleStoreError, match=r"model \"a\" -> \"b\".*--overwrite"):
        reopened.open_stage("stats", {"model": "b", "k": 10})
    np.testing.assert_array_equal(reopened.read("stats/mean"), np.arange(5))  # untouched
    assert reopened.open_stage("stats", {"model": "b", "k": 10}, overwrite=True) is False
    assert not reopened.has("stats/mean")


def test_row_chunks_resume_only_pending(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.open_stage("embed/x", {"n": 10})
    chunks = store.row_chunks(
        "embed/x", 10, 4, {"grad": ((3,), "float32"), "labels": ((), "int64")}
    )
    assert chunks.n_chunks == 3 and chunks.pending() == [0, 1, 2]
    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    chunks.write(1, {"grad": data[4:8], "labels": np.arange(4, 8)})
    chunks.mark_done(1)
    again = RunStore(str(tmp_path / "run")).row_chunks(
        "embed/x", 10, 4, {"grad": ((3,), "float32"), "labels": ((), "int64")}
    )
    assert again.pending() == [0, 2]
    assert list(again.chunk_range(2)) == [8, 9]
    np.testing.assert_array_equal(again.read("grad")[4:8], data[4:8])


def test_bytes_round_trip_and_attrs(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    payload = bytes(range(256)) * 3
    store.write_bytes("detectors/knn/index", payload)
    assert store.read_bytes("detectors/knn/index") == payload
    store.update_root(model={"spec": "x"})
    assert RunStore(str(tmp_path / "run")).attrs["model"] == {"spec": "x"}
    assert store.attrs["format_version"] == FORMAT_VERSION


def test_newer_format_is_refused(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.update_root(format_version=FORMAT_VERSION + 1)
    with pytest.raises(StaleStoreError, match="newer"):
        RunStore(str(tmp_path / "run"))


def test_missing_store_without_create(tmp_path):
    with pytest.raises(BadInputError, match="no run store"):
        RunStore(str(tmp_path / "absent"), create=False)


def test_digest_is_order_independent():
    assert digest_of({"a": 1, "b": [1, 2]}) == digest_of({"b": [1, 2], "a": 1})
    assert digest_of({"a": 1}) != digest_of({"a": 2})


@pytest.mark.parametrize("scheme", ["local", "file", "memory"])
def test_a_failed_command_gets_back_what_it_replaced(tmp_path, scheme):
    url = {
        "local": str(tmp_path / "s"),
        "file": f"file://{tmp_path}/s",
        "memory": f"memory://restore-{tmp_path.name}/s",
    }[scheme]
    store = RunStore(url)
    store.update_root(model={"v": 1})
    store.open_stage("stats", {"a": 1})
    store.write("stats/mean", np.arange(4.0))
    store.complete_stage("stats")
    with pytest.raises(ValueError), store.restoring_on_failure():
        store.update_root(model={"v": 2})
        store.open_stage("stats", {"a": 2}, overwrite=True)  # the old one moves aside
        store.write("stats/mean", np.zeros(2))
        store.open_stage("fresh", {"b": 1})  # opened afresh, nothing written into it
        raise ValueError("bad input found late")
    assert store.attrs["model"] == {"v": 1}
    np.testing.assert_array_equal(store.read("stats/mean"), np.arange(4.0))
    assert store.stage_complete("stats") and not store.has("fresh")
    with store.restoring_on_failure():  # success: the replaced stage is gone for good
        store.open_stage("stats", {"a": 3}, overwrite=True)
        store.write("stats/mean", np.ones(3))
    with pytest.raises(Interrupted), store.restoring_on_failure():
        store.open_stage("stats", {"a": 4}, overwrite=True)
        store.write("stats/mean", np.full(5, 4.0))
        raise Interrupted("stopped")  # an interruption keeps the new partial work to resume
    assert store.group_attrs("stats")["provenance"] == {"a": 4}
    np.testing.assert_array_equal(store.read("stats/mean"), np.full(5, 4.0))
    assert store.children() == ["stats"]
    if scheme == "local":
        assert not (tmp_path / "s" / ".replaced").exists()


def test_what_a_killed_command_left_aside_is_cleared_by_the_next(tmp_path):
    store = RunStore(str(tmp_path / "s"))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    aside = tmp_path / "s" / ".replaced"
    left = {
        f"{host}-{int(gone.stdout)}-0badc0de": False,  # its process is gone: cleared
        f"{host}-{os.getpid()}-0badc0de": True,  # a live process's: kept
        f"elsewhere-{int(gone.stdout)}-0badc0de": True,  # another host's: kept
    }
    for name in left:
        (aside / name / "0").mkdir(parents=True)
        (aside / name / "0" / "zarr.json").write_text("{}")
    with store.restoring_on_failure():
        pass
    assert {name: (aside / name).exists() for name in left} == left


def test_a_stage_another_live_process_computes_is_refused_a_dead_one_s_taken_over(tmp_path):
    store = RunStore(str(tmp_path / "s"))
    locks = tmp_path / "s" / ".locks"
    locks.mkdir(parents=True)
    host = socket.gethostname()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (locks / "stats.lock").write_text(f"{host} {other.pid}")
        claimed = f"another gradcli process \\(pid {other.pid} on .*\\) is computing stats"
        with pytest.raises(BadInputError, match=claimed), store.restoring_on_failure():
            store.open_stage("stats", {"a": 1})
        assert not store.has("stats")  # nothing was written
    finally:
        other.kill()
        other.wait()
    with store.restoring_on_failure():  # the claim's process is gone: taken over
        store.open_stage("stats", {"a": 1})
        assert (locks / "stats.lock").read_text() == f"{host} {os.getpid()}"
    assert not locks.exists()  # released when the command ends


def test_a_store_is_made_by_its_first_write_not_by_opening_it(tmp_path):
    target = tmp_path / "a" / "b"
    store = RunStore(str(target))
    assert not (tmp_path / "a").exists() and not store.exists
    assert store.attrs == {} and not store.has("stats") and store.children() == []
    with pytest.raises(BadInputError, match=f"no run store at {target}.*extract-subspace"):
        store.require()
    with pytest.raises(ValueError), store.restoring_on_failure():  # fails before a chunk
        store.update_root(model={"v": 1})
        store.open_stage("stats", {"a": 1})
        raise ValueError("bad input found late")
    assert not (tmp_path / "a").exists()  # its folders go too
    with pytest.raises(ValueError), store.restoring_on_failure():  # fails after real work
        store.open_stage("stats", {"a": 1})
        store.write("stats/mean", np.arange(3.0))
        raise ValueError("failed later")
    np.testing.assert_array_equal(RunStore(str(target)).read("stats/mean"), np.arange(3.0))


def test_every_array_carries_a_checksum_and_damage_names_its_rows(tmp_path):
    from zarr.codecs import Crc32cCodec

    store = RunStore(str(tmp_path / "s"))
    store.open_stage("embed/x", {"dataset": "npz:/d.npz"})
    data = np.arange(40, dtype=np.float32).reshape(10, 4)
    store.write("embed/x/grad", data, chunk_rows=3)
    store.write("embed/x/raw", data, chunk_rows=3, compress=False)
    store.create_rows("embed/x/rows", (10, 4), "float32", chunk_rows=3)
    chunks = store.row_chunks("embed/x", 10, 3, {"feat": ((2,), "float32")})
    store.flags("embed/x", "blocks", 2)
    for name in ("grad", "raw", "rows", "feat", "done", "blocks"):
        codecs = store.root[f"embed/x/{name}"].metadata.codecs
        assert isinstance(codecs[-1], Crc32cCodec), name
    chunks.write(1, {"feat": np.ones((3, 2), np.float32)})
    for name, chunk in (("grad", 1), ("raw", 3), ("feat", 1)):
        file = tmp_path / "s" / "embed" / "x" / name / "c" / str(chunk) / "0"
        damaged = bytearray(file.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        file.write_bytes(bytes(damaged))
    # brute force: which chunks decode, one at a time
    assert store.damaged_rows("embed/x/grad") == [(3, 6)]
    assert store.damaged_rows("embed/x/raw") == [(9, 10)]
    with pytest.raises(StaleStoreError, match=r"embed/x/grad .* damaged: rows 3-5 .*--dataset"):
        store.read("embed/x/grad")
    with pytest.raises(StaleStoreError, match=r"embed/x/raw .* damaged: rows 9 fail"):
        store.read("embed/x/raw")
    with pytest.raises(StaleStoreError, match=r"embed/x/feat .* rows 3-5"):
        chunks.read("feat")
    np.testing.assert_array_equal(store.read_rows("embed/x/grad", 6, 10), data[6:])  # the rest


def test_arrays_written_without_a_checksum_still_read(tmp_path):
    from zarr.codecs import ZstdCodec

    store = RunStore(str(tmp_path / "s"))
    store.open_stage("stats", {"a": 1})
    data = np.linspace(0, 1, 12, dtype=np.float32).reshape(6, 2)
    legacy = store.root.create_array(  # as the previous version wrote them
        "stats/mean",
        shape=data.shape,
        dtype=data.dtype,
        chunks=(4, 2),
        fill_value=0,
        compressors=(ZstdCodec(level=0),),
    )
    legacy[:] = data
    reopened = RunStore(str(tmp_path / "s"))
    np.testing.assert_array_equal(reopened.read("stats/mean"), data)
    assert reopened.damaged_rows("stats/mean") == []


def test_a_read_only_store_reads_and_refuses_only_real_writes(tmp_path):
    folder = tmp_path / "s"
    store = RunStore(str(folder))
    store.open_stage("stats", {"a": 1})
    store.write("stats/mean", np.arange(3.0))
    store.complete_stage("stats")
    files = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    ro = RunStore(str(folder), read_only=True)
    assert ro.read_only and ro.open_stage("stats", {"a": 1}) is True  # complete: nothing to do
    with ro.restoring_on_failure():
        ro.write("scores/x/msp", np.zeros(3), cache=True)  # a cache: skipped
        ro.put_group("results/x", cache=True, metrics={})
        ro.delete("absent")  # nothing to remove
        np.testing.assert_array_equal(ro.read("stats/mean"), np.arange(3.0))
    for write in (
        lambda: ro.open_stage("embed/y", {"b": 1}, what="embedding 'y'"),
        lambda: ro.write("stats/var", np.ones(3)),
        lambda: ro.update_root(model={}),
        lambda: ro.write_text("results.json", "{}"),
    ):
        with pytest.raises(BadInputError, match=r"read-only and .* writable copy"):
            write()
    assert sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) == files


def test_column_chunked_arrays_read_and_write_column_blocks(tmp_path):
    store = RunStore(str(tmp_path / "s"), create=True)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((7, 50)).astype(np.float32)
    store.create_rows("g/a", (7, 50), "float32", chunk_rows=1, chunk_columns=16)
    for start in range(0, 50, 13):  # blocks that straddle chunk edges
        store.write_columns("g/a", start, data[:, start : start + 13])
    np.testing.assert_array_equal(store.read("g/a"), data)
    np.testing.assert_array_equal(store.read_columns("g/a", 10, 37), data[:, 10:37])
    store.write_rows("g/a", 3, data[3:4] * 2)
    np.testing.assert_array_equal(store.read_rows("g/a", 3, 4), data[3:4] * 2)
