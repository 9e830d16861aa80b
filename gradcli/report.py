"""Results as a rich table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json

from rich.table import Table

from gradcli.metrics import CONVENTIONS
from gradcli.run import Results

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
LABELS = {"fpr95": "FPR95↓", "auroc": "AUROC↑", "aupr_in": "AUPR-In↑", "aupr_out": "AUPR-Out↑"}
LOWER_IS_BETTER = {"fpr95"}
EMBEDDING_LABELS = {"feat": "feature", "grad": "gradient", "ensemble": "ensemble"}


def _best(results: Results, column: str, metric: str) -> float:
    values = []
    for key in results.rows:
        per_set = results.rows[key] if column != "average" else {"average": results.average(key)}
        values.append(per_set[column][metric])
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def results_table(
    results: Results,
    per_set: tuple[str, ...] = ("fpr95", "auroc"),
    average: tuple[str, ...] = METRICS,
) -> Table:
    """Methods × OOD sets (FPR95, AUROC) and the average over sets (all four metrics), in %.

    The best value of each column is bold green, as in the paper's tables.
    """
    table = Table(
        title=f"OOD detection against ID '{results.id_name}' (values in %)",
        caption=f"FPR95 convention ({results.convention}): {CONVENTIONS[results.convention]}",
        caption_justify="left",
    )
    table.add_column("method", no_wrap=True)
    table.add_column("embedding", no_wrap=True)
    columns = [(ood, metric) for ood in results.ood_names for metric in per_set]
    columns += [("average", metric) for metric in average]
    for ood, metric in columns:
        table.add_column(f"{ood}\n{LABELS[metric]}", justify="right", no_wrap=True)
    best = {(ood, metric): _best(results, ood, metric) for ood, metric in columns}
    order = list(EMBEDDING_LABELS)
    for key in sorted(results.rows, key=lambda k: (k[0], order.index(k[1]))):
        method, emb = key
        mean = results.average(key)
        cells = []
        for ood, metric in columns:
            value = mean[metric] if ood == "average" else results.rows[key][ood][metric]
            text = f"{100 * value:.2f}"
            cells.append(f"[bold green]{text}[/]" if value == best[ood, metric] else text)
        table.add_row(method, EMBEDDING_LABELS.get(emb, emb), *cells)
    return table


def results_json(results: Results) -> str:
    """The full results as a JSON document (fractions, not percentages)."""
    document = {
        "id": results.id_name,
        "ood": results.ood_names,
        "convention": results.convention,
        "convention_text": CONVENTIONS[results.convention],
        "head_accuracy": results.head_accuracy,
        "results": results.to_records(),
    }
    return json.dumps(document, indent=2)


def results_csv(results: Results) -> str:
    """One row per (method, embedding, OOD set or 'average')."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", "embedding", "ood", *METRICS])
    writer.writeheader()
    for record in results.to_records():
        writer.writerow({k: record[k] for k in writer.fieldnames})
    return buffer.getvalue()
