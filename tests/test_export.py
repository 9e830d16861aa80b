"""Per-input exports: the CSV and Parquet files hold exactly the scores and flags given."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from gradcli.errors import BadInputError
from gradcli.export import export_scores


def _content(n: int = 25):
    rng = np.random.default_rng(4)
    items = [f"images/{i:03d}.jpg" for i in range(n)]
    scores = {"energy-grad": rng.normal(size=n), "knn-feat": rng.normal(size=n) * 1e-7}
    flags = {"energy-grad": scores["energy-grad"] < 0}
    return items, scores, flags


def test_parquet_round_trip_equals_the_inputs_and_the_csv(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")
    items, scores, flags = _content()
    parquet = export_scores(tmp_path / "out.parquet", items, scores, flags)
    table = pq.read_table(parquet).to_pydict()
    assert list(table) == ["index", "item", "energy-grad", "energy-grad_ood", "knn-feat"]
    assert table["index"] == list(range(len(items))) and table["item"] == items
    for key, values in scores.items():
        np.testing.assert_array_equal(np.array(table[key]), values)  # float64, bit for bit
    assert table["energy-grad_ood"] == flags["energy-grad"].tolist()
    with open(export_scores(tmp_path / "out.csv", items, scores, flags), newline="") as handle:
        rows = list(csv.DictReader(handle))
    for key in scores:
        np.testing.assert_array_equal([float(r[key]) for r in rows], table[key])
    assert [r["energy-grad_ood"] == "1" for r in rows] == table["energy-grad_ood"]
    assert not list(tmp_path.glob(".*.partial"))


def test_mismatched_lengths_leave_no_file(tmp_path):
    items, scores, flags = _content()
    scores["knn-feat"] = scores["knn-feat"][:-1]
    with pytest.raises(BadInputError, match="24 scores for 25 inputs"):
        export_scores(tmp_path / "out.csv", items, scores, flags)
    assert not list(tmp_path.iterdir())


def test_rows_on_a_stream_equal_the_csv_file_and_json_lines(tmp_path):
    import io
    import json

    from gradcli.export import write_rows

    items, scores, flags = _content()
    stream = io.StringIO()
    write_rows(stream, items, scores, flags)
    written = export_scores(tmp_path / "o.csv", items, scores, flags).read_bytes().decode()
    assert stream.getvalue() == written and "\r" not in written
    lines = io.StringIO()
    write_rows(lines, items, scores, flags, json_lines=True)
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [r["item"] for r in records] == items and [r["index"] for r in records] == list(
        range(len(items))
    )
    for key, values in scores.items():
        np.testing.assert_array_equal([r[key] for r in records], values)
    assert [r["energy-grad_ood"] for r in records] == flags["energy-grad"].tolist()
    assert "knn-feat_ood" not in records[0]
