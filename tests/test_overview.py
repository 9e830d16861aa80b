"""What inspect reports: shard status and reconstruction error, against brute force."""

from __future__ import annotations

import numpy as np

from gradcli.overview import shard_status
from gradcli.scores.residual import reconstruction_error


def test_shard_status_matches_a_brute_force_split():
    rng = np.random.default_rng(0)
    for n_chunks, count in ((10, 3), (7, 7), (3, 5), (0, 2)):
        done = rng.random(n_chunks) < 0.6
        status = shard_status(done, count)
        # Shard i owns chunks floor(i·n/count) .. floor((i+1)·n/count) - 1.
        pending: dict[str, list[int]] = {}
        for chunk in range(n_chunks):
            owner = next(i for i in range(count) if chunk < (i + 1) * n_chunks // count)
            if not done[chunk]:
                pending.setdefault(str(owner), []).append(chunk)
        assert status["pending"] == pending
        assert status["complete"] == [i for i in range(count) if str(i) not in pending]
        assert status["count"] == count


def test_reconstruction_error_is_the_relative_residual_outside_the_subspace():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(50, 6)))  # orthonormal V (P, K)
    g = rng.normal(size=(8, 50))
    g[0] = basis @ rng.normal(size=6)  # inside the subspace: error 0
    z = g @ basis
    want = np.linalg.norm(g - z @ basis.T, axis=1) / np.linalg.norm(g, axis=1)
    got = reconstruction_error(z.astype(np.float32), np.linalg.norm(g, axis=1))
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert got[0] < 1e-3
    assert reconstruction_error(np.zeros((1, 6)), np.zeros(1)).tolist() == [0.0]  # ‖G‖ = 0


def test_damaged_arrays_are_the_chunks_that_fail_to_decode(tmp_path):
    from types import SimpleNamespace

    from gradcli.overview import damaged_arrays
    from gradcli.store import RunStore

    store = RunStore(str(tmp_path / "s"))
    store.open_stage("embed/a", {"dataset": "npz:/a.npz"})
    data = np.arange(60, dtype=np.float32).reshape(15, 4)
    store.write("embed/a/grad", data, chunk_rows=4)
    store.write("stats/mean", np.ones(7))
    hit = {0, 2}
    for index in hit:  # chunks 0 and 2: rows 0-3 and 8-11
        file = tmp_path / "s" / "embed" / "a" / "grad" / "c" / str(index) / "0"
        raw = bytearray(file.read_bytes())
        raw[0] ^= 0x01
        file.write_bytes(bytes(raw))
    expected = [[4 * i, min(4 * i + 4, 15)] for i in sorted(hit)]
    found = damaged_arrays(SimpleNamespace(store=store))
    assert [d["array"] for d in found] == ["embed/a/grad"]
    assert found[0]["rows"] == expected
    assert "gradcli embed --overwrite --name a --dataset npz:/a.npz" in found[0]["fix"]


def test_embedding_summary_counts_rows_width_and_done_chunks(tmp_path):
    from types import SimpleNamespace

    from gradcli.overview import embedding_summary
    from gradcli.store import RunStore

    store = RunStore(str(tmp_path / "s"))
    store.open_stage("embed/a", {"dataset": "npz:/a.npz"})
    store.write("embed/a/grad", np.zeros((15, 4), np.float32), chunk_rows=4)
    done = np.array([1, 0, 1, 1], dtype=bool)  # 15 rows in chunks of 4: 4 chunks, 3 done
    store.write("embed/a/done", done, chunk_rows=1)
    run = SimpleNamespace(store=store)
    expected = {"rows": 15, "k": 4, "complete": False, "chunks_done": 3, "chunks": 4}
    assert embedding_summary(run, "a") == expected
    store.complete_stage("embed/a")
    assert embedding_summary(run, "a") == {**expected, "complete": True}


def test_preprocess_summary_is_none_before_a_model_and_the_record_after(tmp_path):
    from types import SimpleNamespace

    from gradcli.config import Preprocess
    from gradcli.overview import preprocess_summary

    assert preprocess_summary(SimpleNamespace(store=SimpleNamespace(attrs={}))) is None
    record = Preprocess(input_size=(28, 28), channels=1, mean=(0.5,), std=(0.25,)).to_dict()
    store = SimpleNamespace(attrs={"model": {"preprocess": record}})
    found = preprocess_summary(SimpleNamespace(store=store))
    assert found == Preprocess.from_dict(record).summary() and found["text"]
