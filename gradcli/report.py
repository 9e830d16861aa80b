"""Results as a rich table, JSON and CSV, and a report folder (Markdown, HTML, PNG plots)."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from gradcli import layout, plots
from gradcli.errors import BadInputError
from gradcli.metrics import CONVENTIONS
from gradcli.results import Results
from gradcli.scores import METHODS

if TYPE_CHECKING:  # report.py is used by run-level code; no import back up at run time
    from gradcli.run import Run

LABELS = {"fpr95": "FPR95↓", "auroc": "AUROC↑", "aupr_in": "AUPR-In↑", "aupr_out": "AUPR-Out↑"}
LOWER_IS_BETTER = {"fpr95"}
EMBEDDING_LABELS = {"feat": "feature", "grad": "gradient", "ensemble": "ensemble"}
PER_SET = ("fpr95", "auroc")


def _best(results: Results, column: str, metric: str) -> float:
    values = []
    for key in results.rows:
        per_set = results.rows[key] if column != "average" else {"average": results.average(key)}
        values.append(per_set[column][metric])
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def results_tables(results: Results, width: int = 80) -> list[Table]:
    """The results as tables that fit ``width`` console columns: one per embedding (feature,
    gradient, ensemble) with rows per method and FPR95 / AUROC (%) per OOD set and their
    average; a table that would be wider is split by OOD set into several. The best value of
    each column over all rows is bold green. AUPR-In/Out are in the JSON, CSV and report.
    """
    groups: list[tuple[str, tuple[str, ...]]] = [(ood, PER_SET) for ood in results.ood_names]
    groups.append(("average", PER_SET))
    if results.calibration:
        groups.append(("ID accept@λ", ()))
    best = {(ood, m): _best(results, ood, m) for ood, metrics in groups for m in metrics}
    keys = ordered_rows(results)
    kinds = list(dict.fromkeys(emb for _, emb in keys))
    caption = (
        f"FPR95 convention ({results.convention}): {CONVENTIONS[results.convention]}. "
        "Bold: best of the column over all embeddings. AUPR-In/Out: --json, results.csv, --report."
    )
    measure = Console(width=10_000, file=io.StringIO())

    def build(kind: str, part: list[tuple[str, tuple[str, ...]]], title: str) -> Table:
        table = Table(title=title, title_justify="left", caption_justify="left")
        table.add_column("method", overflow="fold")
        for ood, metrics in part:
            if not metrics:
                table.add_column(ood, justify="right", overflow="fold")
            for i, metric in enumerate(metrics):  # the set's name heads its first column
                header = f"{ood if i == 0 else ''}\n{LABELS[metric]}"
                table.add_column(header, justify="right", overflow="fold")
        for key in (k for k in keys if k[1] == kind):
            cells = [key[0]]
            for ood, metrics in part:
                if not metrics:
                    cells.append(_acceptance_text(results, key))
                for metric in metrics:
                    value = _value(results, key, ood, metric)
                    text = f"{100 * value:.2f}"
                    cells.append(f"[bold green]{text}[/]" if value == best[ood, metric] else text)
            table.add_row(*cells)
        return table

    def fits(table: Table) -> bool:
        return Measurement.get(measure, measure.options, table).maximum <= width

    tables = []
    for kind in kinds:
        label = EMBEDDING_LABELS.get(kind, kind)
        title = f"{label} scores against ID '{results.id_name}' (values in %)"
        parts: list[list[tuple[str, tuple[str, ...]]]] = [[]]
        for group in groups:
            if parts[-1] and not fits(build(kind, [*parts[-1], group], title)):
                parts.append([])
            parts[-1].append(group)
        for i, part in enumerate(parts):
            named = title + (f", part {i + 1} of {len(parts)}" if len(parts) > 1 else "")
            tables.append(build(kind, part, named))
    if tables:
        tables[-1].caption = caption
    return tables


def ordered_rows(results: Results) -> list[tuple[str, str]]:
    """(method, embedding) rows in registry order, then feature, gradient, ensemble."""
    order = list(EMBEDDING_LABELS)

    def rank(key: tuple[str, str]) -> tuple:
        method, emb = key
        position = METHODS.index(method) if method in METHODS else len(METHODS)
        return (position, method, order.index(emb) if emb in order else len(order))

    return sorted(results.rows, key=rank)


def _value(results: Results, key: tuple[str, str], ood: str, metric: str) -> float:
    if ood == "average":
        return results.average(key)[metric]
    return results.rows[key][ood][metric]


def _acceptance_text(results: Results, key: tuple[str, str]) -> str:
    """Realised ID test acceptance at the calibrated λ, in %, '-' when there is none."""
    entry = results.calibration.get("-".join(key))
    if entry is None:
        return "-"
    if entry.get("stale"):
        return "stale"
    return f"{100 * entry['id_acceptance']:.2f}"


def sweep_tables(records: Sequence[dict]) -> list[Table]:
    """One rich table per swept parameter: rows method × embedding × value, columns FPR95 and
    AUROC per OOD set and their average, in %."""
    tables = []
    for parameter in dict.fromkeys(r["parameter"] for r in records):
        mine = [r for r in records if r["parameter"] == parameter]
        oods = list(dict.fromkeys(r["ood"] for r in mine))
        table = Table(title=f"sweep of {parameter} (values in %)")
        for column in ("method", "embedding", parameter):
            table.add_column(column, no_wrap=True)
        for ood in oods:
            for metric in ("fpr95", "auroc"):
                table.add_column(f"{ood}\n{LABELS[metric]}", justify="right", no_wrap=True)
        for method, emb, value in dict.fromkeys(
            (r["method"], r["embedding"], r["value"]) for r in mine
        ):
            cells = {
                r["ood"]: r
                for r in mine
                if (r["method"], r["embedding"], r["value"]) == (method, emb, value)
            }
            row = [method, EMBEDDING_LABELS.get(emb, emb), f"{value:g}"]
            row += [f"{100 * cells[o][m]:.2f}" for o in oods for m in ("fpr95", "auroc")]
            table.add_row(*row)
        tables.append(table)
    return tables


# -- report folder ------------------------------------------------------------------------


def _columns(results: Results) -> list[tuple[str, str]]:
    return [(ood, m) for ood in [*results.ood_names, "average"] for m in PER_SET]


def results_markdown(results: Results) -> str:
    """The paper's Table 3 layout in Markdown: rows method × embedding, FPR95/AUROC (%) per OOD
    set and their average, the best value of each column in bold."""
    columns = _columns(results)
    best = {c: _best(results, *c) for c in columns}
    calibrated = bool(results.calibration)
    header = ["Method", "Embedding"]
    header += [f"{'Average' if o == 'average' else o} {LABELS[m]}" for o, m in columns]
    header += ["ID accept@λ"] if calibrated else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "--:|" * (len(header) - 2)]
    for key in ordered_rows(results):
        cells = [key[0], EMBEDDING_LABELS.get(key[1], key[1])]
        for column in columns:
            value = _value(results, key, *column)
            text = f"{100 * value:.2f}"
            cells.append(f"**{text}**" if value == best[column] else text)
        if calibrated:
            cells.append(_acceptance_text(results, key))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_html(results: Results) -> str:
    """The same table in HTML, with each OOD set's header spanning its two metrics."""
    columns = _columns(results)
    best = {c: _best(results, *c) for c in columns}
    calibrated = bool(results.calibration)
    groups = [*results.ood_names, "Average"]
    top = '<tr><th rowspan="2">Method</th><th rowspan="2">Embedding</th>'
    top += "".join(f'<th colspan="2">{_text(g)}</th>' for g in groups)
    top += '<th rowspan="2">ID accept@λ</th>' if calibrated else ""
    sub = "<tr>" + "".join(f"<th>{LABELS[m]}</th>" for _ in groups for m in PER_SET) + "</tr>"
    rows = []
    keys = ordered_rows(results)
    for i, key in enumerate(keys):
        span = sum(1 for k in keys if k[0] == key[0])
        first = i == 0 or keys[i - 1][0] != key[0]
        cells = f'<td rowspan="{span}">{_text(key[0])}</td>' if first else ""
        cells += f"<td>{EMBEDDING_LABELS.get(key[1], key[1])}</td>"
        for column in columns:
            value = _value(results, key, *column)
            text = f"{100 * value:.2f}"
            cells += f"<td><b>{text}</b></td>" if value == best[column] else f"<td>{text}</td>"
        if calibrated:
            cells += f"<td>{_acceptance_text(results, key)}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return (
        f"<table>\n<thead>{top}</tr>\n{sub}</thead>\n<tbody>\n"
        + "\n".join(rows)
        + ("\n</tbody>\n</table>\n")
    )


def _calibration_markdown(results: Results) -> str:
    header = ["Score", "Calibrated on", "TPR", "λ", "ID test accepted", *results.ood_names]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "--:|" * (len(header) - 2)]
    for key, entry in results.calibration.items():
        cells = [key, entry["calibrated_on"], f"{entry['tpr']:g}", f"{entry['threshold']:.6g}"]
        if entry.get("stale"):
            cells += ["stale: recalibrate"] + ["-"] * len(results.ood_names)
        else:
            cells.append(f"{100 * entry['id_acceptance']:.2f}%")
            cells += [f"{100 * entry['ood_acceptance'][o]:.2f}%" for o in results.ood_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sweep_markdown(records: Sequence[dict], parameter: str) -> str:
    mine = [r for r in records if r["parameter"] == parameter]
    oods = list(dict.fromkeys(r["ood"] for r in mine))
    header = ["Method", "Embedding", parameter]
    header += [f"{o if o != 'average' else 'Average'} {LABELS[m]}" for o in oods for m in PER_SET]
    lines = ["| " + " | ".join(header) + " |", "|---|---|--:|" + "--:|" * (len(header) - 3)]
    index = {(r["method"], r["embedding"], r["value"], r["ood"]): r for r in mine}
    for method, emb, value in dict.fromkeys(
        (r["method"], r["embedding"], r["value"]) for r in mine
    ):
        cells = [method, EMBEDDING_LABELS.get(emb, emb), f"{value:g}"]
        cells += [f"{100 * index[method, emb, value, o][m]:.2f}" for o in oods for m in PER_SET]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_density_dim(run: Run, dim: int) -> int:
    """``dim`` when it names a dimension of the store's reduced gradients, else an error."""
    if not run.store.stage_complete(layout.SUBSPACE):
        return dim  # the evaluation itself will say that extract-subspace comes first
    k = int(run.store.shape(layout.BASIS)[1])
    if not 0 <= dim < k:
        raise BadInputError(
            f"--density-dim {dim} is out of range: the reduced gradient has K={k} dimensions, "
            f"use 0 to {k - 1}"
        )
    return dim


def _best_key(results: Results, kind: str) -> str | None:
    """The '<method>-<kind>' row with the lowest average FPR95 (highest AUROC on ties)."""
    keys = [key for key in results.rows if key[1] == kind]
    if not keys:
        return None
    method, _ = min(keys, key=lambda k: (results.average(k)["fpr95"], -results.average(k)["auroc"]))
    return f"{method}-{kind}"


def _figures(run: Run, results: Results, folder: Path, density_dim: int) -> list[Path]:
    from gradcli.overview import plot_spectrum, spectrum_of

    figures = []
    keys = ["-".join(key) for key in ordered_rows(results)]
    for ood in results.ood_names:
        path = folder / f"roc-{plots.safe_name(ood)}.png"
        figures.append(
            plots.roc_figure(path, results.id_scores, results.ood_scores[ood], ood, keys)
        )
    best = [k for k in (_best_key(results, "feat"), _best_key(results, "grad")) if k]
    if best:
        path = folder / "histograms.png"
        figures.append(plots.histogram_figure(path, results.id_scores, results.ood_scores, best))
    spectrum = spectrum_of(run)
    if spectrum and "eigenvalues" in spectrum:
        figures += plot_spectrum({"spectrum": spectrum}, folder)
    grad = {
        name: run.load_embedding(name)["grad"] for name in [results.id_name, *results.ood_names]
    }
    figures.append(
        plots.density_figure(
            folder / f"density-dim{density_dim}.png",
            grad[results.id_name][:, density_dim],
            {name: grad[name][:, density_dim] for name in results.ood_names},
            density_dim,
        )
    )
    for parameter in dict.fromkeys(r["parameter"] for r in results.sweeps):
        path = folder / f"sweep-{plots.safe_name(parameter)}.png"
        figures.append(plots.sweep_figure(path, results.sweeps, parameter))
    return figures


def write_report(
    run: Run, results: Results, folder: str | Path, *, density_dim: int = 0
) -> list[Path]:
    """report.md and report.html in ``folder`` (created), with PNG plots when matplotlib is
    installed: ROC curves per OOD set, score histograms of the best feature and gradient
    scores, the PCA spectrum, the density of reduced-gradient dimension ``density_dim``, and
    sweep curves. Returns the files written."""
    check_density_dim(run, density_dim)
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create the report folder {target}: {error}") from None
    figures = _figures(run, results, target, density_dim) if plots.pyplot() else []
    convention = f"FPR95 convention ({results.convention}): {CONVENTIONS[results.convention]}."
    title = f"OOD detection against ID '{results.id_name}'"
    md = [f"# {title}", "", f"Values in %. {convention} Best of each column in bold.", ""]
    md.append(results_markdown(results))
    page = [f"<h1>{_text(title)}</h1>", f"<p>Values in %. {_text(convention)}</p>"]
    page.append(results_html(results))
    if results.calibration:
        note = (
            "Thresholds λ accept the given share (TPR) of the calibration set; the columns give "
            "the share of each set accepted as ID at λ (for OOD sets, the realised FPR)."
        )
        md += ["## Calibrated thresholds", "", note, "", _calibration_markdown(results)]
        page += ["<h2>Calibrated thresholds</h2>", f"<p>{_text(note)}</p>"]
        page.append(_markdown_table_html(_calibration_markdown(results)))
    for parameter in dict.fromkeys(r["parameter"] for r in results.sweeps):
        table = _sweep_markdown(results.sweeps, parameter)
        md += [f"## Sweep of {parameter}", "", table]
        page += [f"<h2>Sweep of {_text(parameter)}</h2>", _markdown_table_html(table)]
    md += ["## Figures", ""]
    page.append("<h2>Figures</h2>")
    if figures:
        for path in figures:
            md += [f"![{path.stem}]({path.name})", ""]
            name = html.escape(path.name)
            page.append(f'<p><img src="{name}" alt="{html.escape(path.stem)}"></p>')
    else:
        md += [f"No plots: {plots.PLOT_HINT}.", ""]
        page.append(f"<p>No plots: {_text(plots.PLOT_HINT)}.</p>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    document = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_text(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(page) + "\n</body></html>\n"
    )
    written = []
    for name, text in (("report.md", "\n".join(md)), ("report.html", document)):
        path = target / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written + figures


def _text(value: str) -> str:
    """HTML-escaped text content (quotes kept as they are: they are not in an attribute)."""
    return html.escape(value, quote=False)


def _markdown_table_html(markdown: str) -> str:
    """A simple Markdown table (as written above) as an HTML table; ``**x**`` becomes bold."""
    rows = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    head, body = rows[0], rows[2:]

    def cell(text: str, tag: str) -> str:
        text = _text(text.strip())
        if text.startswith("**") and text.endswith("**"):
            text = f"<b>{text[2:-2]}</b>"
        return f"<{tag}>{text}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell(c, "th") for c in head) + "</tr>"]
    out += ["<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in body]
    return "\n".join([*out, "</table>"])
