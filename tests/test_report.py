"""evaluate --report (Markdown, HTML, plots) and --sweep against independent computations."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gradcli.errors import BadInputError
from gradcli.models import load_model
from gradcli.results import Results
from gradcli.store import RunStore

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ready(tiny, tmp_path_factory):
    """A fitted store with the ID test set embedded as 'id'."""
    from gradcli.cli import main

    store = tmp_path_factory.mktemp("report") / "run"
    assert main([str(a) for a in tiny.extract_args(store)]) == 0
    assert main(["embed", "--dataset", tiny.test, "--name", "id", "--store", str(store), "-q"]) == 0
    assert main(["fit-head", "--knn-k", "5", "--id-test", "id", "--store", str(store), "-q"]) == 0
    return store


def _metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float]:
    fpr = float(np.mean(ood_scores >= np.percentile(id_scores, 5)))
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return fpr, float(roc_auc_score(labels, np.r_[id_scores, ood_scores]))


def _energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits / temperature
    top = scaled.max(axis=1, keepdims=True)
    return temperature * (top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1)))


def test_sweeps_match_detectors_computed_directly(ready, tiny, cli):
    outcome = cli(
        "evaluate",
        "--ood",
        tiny.ood,
        "--id",
        "id",
        "--method",
        "knn",
        "--sweep",
        "k=1,3",
        "--sweep",
        "percentile=80",
        "--sweep",
        "T=2",
        "--sweep",
        "lambda=0.5",
        "--sweep",
        "d=1",
        "--store",
        ready,
        "-q",
        "--json",
    )
    assert outcome.code == 0, outcome.err
    records = outcome.json()["sweeps"]
    found = {
        (r["parameter"], r["value"], r["method"], r["embedding"], r["ood"]): r for r in records
    }
    assert {p for p, *_ in found} == {"k", "percentile", "temperature", "lambda", "d"}
    store = RunStore(str(ready))
    arrays = {
        name: {key: store.read(f"embed/{name}/{key}") for key in ("grad", "feat", "logits")}
        for name in ("npz-train", "id", "npz-ood")
    }

    def unit(z):
        z = z.astype(np.float64)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    train = unit(arrays["npz-train"]["grad"])  # KNN, k = 3, by brute force on gradients
    knn = {
        name: -np.sort(np.linalg.norm(unit(arrays[name]["grad"])[:, None] - train, axis=2))[:, 2]
        for name in ("id", "npz-ood")
    }
    fpr, auroc = _metrics(knn["id"], knn["npz-ood"])
    row = found["k", 3, "knn", "grad", "npz-ood"]
    assert row["fpr95"] == pytest.approx(fpr) and row["auroc"] == pytest.approx(auroc)
    assert found["k", 3, "knn", "grad", "average"]["auroc"] == pytest.approx(auroc)

    last = load_model(tiny.model, str(tiny.weights), input_size=8).module[-1]
    weight, bias = last.weight.detach().double().numpy(), last.bias.detach().double().numpy()
    tau = np.percentile(arrays["npz-train"]["feat"], 80)  # ReAct on features, refitted
    react = {n: _energy(np.minimum(arrays[n]["feat"], tau) @ weight.T + bias) for n in knn}
    fpr, auroc = _metrics(react["id"], react["npz-ood"])
    row = found["percentile", 80.0, "react", "feat", "npz-ood"]
    assert row["fpr95"] == pytest.approx(fpr) and row["auroc"] == pytest.approx(auroc)

    energy = {n: _energy(arrays[n]["logits"].astype(np.float64), 2.0) for n in knn}
    fpr, auroc = _metrics(energy["id"], energy["npz-ood"])
    row = found["temperature", 2.0, "energy", "feat", "npz-ood"]
    assert row["fpr95"] == pytest.approx(fpr) and row["auroc"] == pytest.approx(auroc)

    table = cli("evaluate", "--ood", tiny.ood, "--id", "id", "--sweep", "k=1,3", "--store", ready)
    assert table.code == 0 and "sweep of k" in table.out
    bad = cli("evaluate", "--ood", tiny.ood, "--id", "id", "--sweep", "depth=3", "--store", ready)
    assert bad.code == 2 and "unknown sweep parameter 'depth'" in bad.err


def _first_table(text: str) -> list[list[str]]:
    """Header and body cells of the first Markdown table in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [lines[start]] + lines[start + 2 : end]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in rows]


def test_report_has_the_paper_table_and_plots(ready, tiny, cli, tmp_path):
    folder = tmp_path / "report"
    outcome = cli(
        "evaluate",
        "--ood",
        tiny.ood,
        "--id",
        "id",
        "--method",
        "knn,energy,vim,gradnorm",
        "--sweep",
        "k=1,3",
        "--report",
        folder,
        "--density-dim",
        "1",
        "--results-dir",
        tmp_path,
        "--store",
        ready,
        "-q",
    )
    assert outcome.code == 0, outcome.err
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    rows = _first_table((folder / "report.md").read_text())
    header, table_rows = rows[0], rows[1:]
    assert header[:2] == ["Method", "Embedding"]
    assert header[2:] == ["npz-ood FPR95↓", "npz-ood AUROC↑", "Average FPR95↓", "Average AUROC↑"]
    labels = {"feat": "feature", "grad": "gradient", "ensemble": "ensemble"}
    expected = {(r["method"], labels[r["embedding"]]) for r in records if r["ood"] == "npz-ood"}
    assert {(r[0], r[1]) for r in table_rows} == expected
    assert ("vim", "feature") in expected and ("gradnorm", "feature") in expected
    for column, (ood, metric) in enumerate(
        [("npz-ood", "fpr95"), ("npz-ood", "auroc"), ("average", "fpr95"), ("average", "auroc")]
    ):
        values = {
            (r["method"], labels[r["embedding"]]): r[metric] for r in records if r["ood"] == ood
        }
        best = min(values.values()) if metric == "fpr95" else max(values.values())
        for row in table_rows:
            cell = row[2 + column]
            assert float(cell.strip("*")) == pytest.approx(100 * values[row[0], row[1]], abs=0.006)
            assert cell.startswith("**") == (values[row[0], row[1]] == best), (row, column)
    html = (folder / "report.html").read_text()
    assert "<b>" in html and 'colspan="2">npz-ood</th>' in html and "Sweep of k" in html
    for name in ("roc-npz-ood.png", "histograms.png", "density-dim1.png", "sweep-k.png"):
        assert (folder / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in (folder / "report.md").read_text()
    out_of_range = cli(
        "evaluate", "--ood", tiny.ood, "--id", "id", "--report", folder, "--density-dim", "2",
        "--store", ready,
    )  # fmt: skip
    assert out_of_range.code == 2 and "K=2" in out_of_range.err and "use 0 to 1" in out_of_range.err


def test_report_without_matplotlib_says_how_to_get_plots(ready, tiny, cli, tmp_path, monkeypatch):
    monkeypatch.setattr("gradcli.plots.pyplot", lambda: None)
    folder = tmp_path / "plain"
    outcome = cli(
        "evaluate", "--ood", tiny.ood, "--id", "id", "--method", "knn", "--report", folder,
        "--results-dir", tmp_path, "--store", ready,
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    assert "pip install 'gradcli[plot]'" in (folder / "report.md").read_text()
    assert "pip install 'gradcli[plot]'" in (folder / "report.html").read_text()
    assert "pip install 'gradcli[plot]'" in outcome.out
    assert not list(folder.glob("*.png"))


def test_report_of_a_pca_store_shows_the_spectrum(tiny, tmp_path, cli):
    store = tmp_path / "pca"
    extract = [*tiny.extract_args(store), "--method", "pca", "--k", "3", "--iterations", "1"]
    assert cli(*extract).code == 0
    folder = tmp_path / "report"
    outcome = cli(
        "evaluate", "--ood", tiny.ood, "--id", tiny.test, "--method", "knn", "--report", folder,
        "--store", store, "-q",
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    assert (folder / "spectrum.png").read_bytes()[:8] == PNG
    assert "](spectrum.png)" in (folder / "report.md").read_text()


def _row_cells(text: str) -> dict[str, dict[str, list[str]]]:
    """Body cells per table title prefix ('feature', ...) and method, parts joined in order."""
    out: dict[str, dict[str, list[str]]] = {}
    kind = None
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("feature", "gradient", "ensemble") and "scores" in line:
            kind = words[0]
        elif line.startswith("│") and kind:
            cells = [c.strip() for c in line.strip("│").split("│")]
            out.setdefault(kind, {}).setdefault(cells[0], []).extend(cells[1:])
    return out


def test_results_tables_fit_80_columns_and_show_every_number():
    from rich.console import Console

    from gradcli.report import results_tables
    from gradcli.results import Results
    from gradcli.scores import METHODS

    rng = np.random.default_rng(7)
    oods = ["fashion-test", "animals-test", "texture-patches-test", "digits-test"]
    results = Results(id_name="mnist5k-test", ood_names=oods)
    metrics = ("fpr95", "auroc", "aupr_in", "aupr_out")
    for method in METHODS:
        for emb in ("feat", "grad", "ensemble"):
            results.rows[method, emb] = {
                o: dict(zip(metrics, rng.uniform(0, 1, 4), strict=True)) for o in oods
            }
    console = Console(width=80, record=True, file=io.StringIO())
    for table in results_tables(results, 80):
        console.print(table)
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    cells = _row_cells(text)
    labels = {"feat": "feature", "grad": "gradient", "ensemble": "ensemble"}
    for (method, emb), per_set in results.rows.items():
        want = [f"{100 * per_set[o][m]:.2f}" for o in oods for m in ("fpr95", "auroc")]
        want += [f"{100 * np.mean([per_set[o][m] for o in oods]):.2f}" for m in ("fpr95", "auroc")]
        assert cells[labels[emb]][method] == want, (method, emb)


def _results(ood: dict[str, float]) -> Results:
    rows = {
        ("knn", "grad"): {name: dict.fromkeys(METRIC_NAMES, value) for name, value in ood.items()}
    }
    return Results(id_name="id", ood_names=list(ood), rows=rows)


METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out")


def test_save_results_merges_by_ood_set_into_a_folder_or_the_store(tmp_path):
    from gradcli.results import save_results
    from gradcli.store import RunStore

    first, second = _results({"a": 0.1, "b": 0.2}), _results({"b": 0.4})
    folder = tmp_path / "out"
    assert save_results("unused", first, folder) == [
        str(folder / "results.json"),
        str(folder / "results.csv"),
    ]
    save_results("unused", second, folder)  # b replaced, a kept
    store = RunStore(str(tmp_path / "run"))
    for results in (first, second):
        written = save_results(store, results)
    assert [w.rsplit("/", 1)[-1] for w in written] == ["results.json", "results.csv"]
    by_url = tmp_path / "by-url"
    RunStore(str(by_url)).write_text("notes.txt", "a store made")
    save_results(str(by_url), first)
    save_results(str(by_url), second)
    for text in (
        (folder / "results.json").read_text(),
        store.read_text("results.json"),
        (by_url / "results.json").read_text(),
    ):
        records = json.loads(text)["results"]
        fpr = {r["ood"]: r["fpr95"] for r in records}
        assert fpr == {"a": 0.1, "b": 0.4, "average": pytest.approx((0.1 + 0.4) / 2)}
    rows = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
    assert {row["ood"] for row in rows} == {"a", "b", "average"}


def test_save_results_into_an_unwritable_folder_is_a_one_line_error(tmp_path):
    from gradcli.results import save_results

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(
        BadInputError, match="cannot write results to .*; pass another --results-dir"
    ):
        save_results("unused", _results({"a": 0.1}), afile / "sub")
