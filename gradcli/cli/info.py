"""What gradcli and a store hold: `methods`, `inspect`, `datasets`, `demo` and `version`.

Commands that describe rather than compute a stage (demo runs the built-in benchmark end
to end), gathered so that the stage modules hold one stage each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gradcli import __version__
from gradcli.cli import common
from gradcli.cli.app import app, err
from gradcli.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_STORE,
    DataRoot,
    Debug,
    Device,
    Json,
    Quiet,
    Store,
    Workers,
)


@app.command(epilog="Example: gradcli methods --json")
def methods(
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """The OOD scores gradcli knows: embeddings, options, what they need, and their papers."""
    from gradcli.scores import describe_methods

    rows = describe_methods()
    if as_json:
        common.emit({"methods": rows}, True)
        return
    table = Table(title="methods (scores: higher = more in-distribution)")
    for column in ("name", "embeddings", "options", "needs", "summary"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            ",".join(row["embeddings"]),
            ",".join(row["options"]) or "-",
            row["needs"] + (", fitted" if row["fitted"] else ""),
            row["summary"],
        )
    common.out().print(table)


@app.command(epilog="Example: gradcli inspect --store artifacts/pca --dataset svhn --plot plots/")
def inspect(
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SPEC", help="Embed these datasets first to report their reconstruction error."
        ),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(help="Write the PCA spectrum plots (PNG) to this folder (PCA stores)."),
    ] = None,
    store: Store = DEFAULT_STORE,
    device: Device = DEFAULT_DEVICE,
    data_root: DataRoot = None,
    workers: Workers = None,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """What the store holds: stages, shapes, completion, config, spectrum, reconstruction error."""
    from gradcli.overview import describe, plot_spectrum

    run = common.open_run(store, device, data_root, quiet, workers)
    with run.store.restoring_on_failure():
        for spec in dataset or []:
            run.embed(spec)
    report = describe(run)
    if plot:
        report["plots"] = [str(p) for p in plot_spectrum(report, plot)]
    if as_json:
        common.emit(report, True)
        return
    console = common.out()
    model = report.get("model") or {}
    console.print(
        f"[bold]{report['store']}[/] gradcli {report['gradcli_version']}, created "
        f"{report['created']}\nmodel {model.get('spec')} (weights sha256 "
        f"{str(model.get('weights_sha256'))[:12]}), {report['parameters'] or 0:,} parameters; "
        f"ID train {report['id_train']}, ID test {report['id_test']}",
        highlight=False,
    )
    stages = Table(title="stages")
    for column in ("stage", "complete", "arrays"):
        stages.add_column(column)
    for stage, info in report["stages"].items():
        arrays = ", ".join(f"{n} {tuple(shape)}" for n, shape in info["arrays"].items())
        done = "yes" if info["complete"] else f"no {info.get('resume_point', '')}"
        stages.add_row(stage, done, arrays)
    console.print(stages)
    spectrum = report.get("spectrum")
    if spectrum and "eigenvalues" in spectrum:
        table = Table(title=f"PCA spectrum (K={spectrum['k']})")
        for column in ("component", "eigenvalue", "explained %", "cumulative %"):
            table.add_column(column, justify="right")
        values = spectrum["eigenvalues"]
        shown = sorted({0, 1, 2, 4, 9, 19, 49, 99, 199, len(values) - 1} & set(range(len(values))))
        for i in shown:
            table.add_row(
                str(i + 1),
                f"{values[i]:.4g}",
                f"{100 * spectrum['explained'][i]:.2f}",
                f"{100 * spectrum['cumulative'][i]:.2f}",
            )
        console.print(table)
    embeddings = Table(title="embeddings")
    for column in ("name", "dataset", "shape", "chunks done", "reconstruction error"):
        embeddings.add_column(column)
    for name, info in report["embeddings"].items():
        error = info.get("reconstruction_error") or {}
        text = f"{error['mean']:.3f} ± {error['std']:.3f}" if error.get("mean") is not None else "-"
        chunks = info.get("chunks_done", "-")
        shards = info.get("shards")
        if shards:
            owed = ", ".join(shards["pending"])
            chunks += f" (shards done {len(shards['complete'])}/{shards['count']}; rerun {owed})"
        embeddings.add_row(
            name, str(info["dataset"]), str(tuple(info.get("shape", ()))), chunks, text
        )
    console.print(embeddings)
    for entry in report["damaged"]:
        rows = ", ".join(f"{a}-{b - 1}" for a, b in entry["rows"])
        console.print(
            f"damaged: {entry['array']} rows {rows} fail their checksum; {entry['fix']}",
            highlight=False,
            markup=False,
        )
    for path in report.get("plots", []):
        console.print(f"wrote {path}")


@app.command(epilog="Example: gradcli datasets --data-root ~/data")
def datasets(
    data_root: DataRoot = None,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """The dataset names gradcli knows: benchmark, layout, expected and found image counts.

    Found sets are counted (files listed, archives read: seconds for ImageNet); a count unlike
    the release's is marked, and a run using that set says so too.
    """
    from gradcli.data import DATA_ROOT_ENV, list_datasets

    rows = list_datasets(data_root or os.environ.get(DATA_ROOT_ENV), count=True)
    if as_json:
        common.emit({"datasets": rows}, True)
        return
    table = Table(title="datasets (images: found / expected per split)")
    for column in ("name", "benchmark", "found", "images", "layout", "source"):
        table.add_column(column)
    for row in rows:
        found = "[green]yes[/]" if row["found"] else "[dim]no[/]"
        source = row["source"] if row["kind"] == "benchmark" else ""  # builtins: the layout
        table.add_row(row["name"], row["benchmark"], found, _counts(row), row["layout"], source)
    common.out().print(table)


def _counts(row: dict) -> str:
    """``split found/expected`` per split, a found count unlike the expected one in red."""
    parts = []
    for split in row["splits"]:
        expected = row["expected"].get(split)
        want = f"{expected:,}" if expected is not None else "?"
        if split not in row["counts"]:
            parts.append(f"{split} -/{want}")
            continue
        got = row["counts"][split]
        text = "unreadable" if got is None else f"{got:,}"
        if got != expected:
            text = f"[red]{text}[/]"
        parts.append(f"{split} {text}/{want}")
    return "\n".join(parts)


@app.command(epilog="Example: gradcli demo")
def demo(
    store: Annotated[
        str, typer.Option(help="Run store of the demo (a local folder).")
    ] = "artifacts/demo",
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """The built-in offline benchmark: a small CNN on MNIST digits against every offline OOD set."""
    from gradcli.demo import ID_TEST, ID_TRAIN, run_demo, skipped_ood_sets
    from gradcli.progress import NullProgress, RichProgress
    from gradcli.report import results_tables
    from gradcli.results import results_json, save_results

    progress = NullProgress() if quiet else RichProgress(err)
    skipped = skipped_ood_sets()
    results = run_demo(store, progress=progress)
    folder = Path(store).resolve()
    saved = save_results(store, results, storage_options=common.storage_options())
    written = [str(folder / Path(path).name) for path in saved]
    if as_json:
        document = json.loads(results_json(results))
        document.update(
            store=str(folder),
            results_files=written,
            id_train=ID_TRAIN,
            id_test=ID_TEST,
            skipped=skipped,
        )
        print(json.dumps(document, indent=2))
        return
    console = common.out()
    for table in results_tables(results, console.width):
        console.print(table)
    ran = ", ".join(results.ood_names)
    lines = [f"demo: ID {ID_TRAIN} (train) and {ID_TEST} (test) against {ran}"]
    lines += [f"{name}: skipped, {why}" for name, why in skipped.items()]
    lines.append(f"store: {folder} (rerun: gradcli evaluate --store {store} --ood ...)")
    lines.append(
        f"results: {' and '.join(written)}"
        if written
        else "results: not saved (the store is read-only); gradcli evaluate --results-dir DIR"
    )
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


@app.command(epilog="Example: gradcli version --json")
def version(as_json: Json = False, debug: Debug = False) -> None:
    """Print gradcli's version."""
    common.emit({"version": __version__}, as_json, __version__)
