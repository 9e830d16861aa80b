"""`gradcli evaluate`: the metrics of every method against OOD sets, sweeps and reports.

The last stage: runs whatever stage is missing, then saves and prints the results.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gradcli.cli import common, parse
from gradcli.cli.app import app, err
from gradcli.cli.options import (
    DEFAULT_BAD_IMAGE,
    DEFAULT_BASIS_DTYPE,
    DEFAULT_DEVICE,
    DEFAULT_STORE,
    BadImage,
    BasisDtype,
    Batch,
    Budget,
    DataRoot,
    Debug,
    Device,
    Embedding,
    Json,
    Method,
    Quiet,
    Store,
    Workers,
    detector_options,
    extend,
)
from gradcli.errors import BadInputError
from gradcli.stages import defaults


def _sweep_parameter() -> inspect.Parameter:
    """``--sweep``, whose help lists the sweepable options (``SWEEP_HELP`` of the sweep stage)."""
    from gradcli.stages.sweep import SWEEP_HELP

    option = typer.Option(metavar="PARAM=VALUES", help=SWEEP_HELP)
    return inspect.Parameter(
        "sweep",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[list[str] | None, option],
        default=None,
    )


@app.command(
    epilog="Example: gradcli evaluate --ood places --ood textures --sweep k=1,5,10,50 "
    "--report report/ --json"
)
@extend(lambda: [_sweep_parameter()], before="odin_temperature")
@detector_options("score", before="batch_size")
def evaluate(
    ood: Annotated[
        list[str],
        typer.Option(
            metavar="SPEC",
            help="OOD dataset spec or stored embedding name; comma-separated or repeated.",
        ),
    ],
    id_dataset: Annotated[
        str | None,
        typer.Option("--id-test", help="ID test set (default: the subspace's test split)."),
    ] = None,
    id_alias: Annotated[str | None, typer.Option("--id", hidden=True)] = None,
    method: Method = None,
    embedding: Embedding = None,
    alpha: Annotated[float, typer.Option(help="Ensemble weight α.")] = defaults.ALPHA,
    fpr_convention: Annotated[
        str, typer.Option(help="paper (ID positive) or openood (OOD positive).")
    ] = "paper",
    results_dir: Annotated[
        str | None, typer.Option(help="Folder for results.json/.csv (default: the store itself).")
    ] = None,
    report: Annotated[
        str | None,
        typer.Option(help="Write report.md, report.html and PNG plots into this folder."),
    ] = None,
    density_dim: Annotated[
        int, typer.Option(help="Report: reduced-gradient dimension of the density plot.")
    ] = 0,
    batch_size: Batch = None,
    store: Store = DEFAULT_STORE,
    device: Device = DEFAULT_DEVICE,
    data_root: DataRoot = None,
    workers: Workers = None,
    memory_budget: Budget = None,
    on_bad_image: BadImage = DEFAULT_BAD_IMAGE,
    basis_dtype: BasisDtype = DEFAULT_BASIS_DTYPE,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
    **detector: Any,
) -> None:
    """FPR95, AUROC, AUPR-In and AUPR-Out of every method, running any missing stage first."""
    sweep: list[str] | None = detector.pop("sweep")
    from gradcli.metrics import CONVENTIONS
    from gradcli.overview import preprocess_summary
    from gradcli.report import check_density_dim, results_tables, sweep_tables, write_report
    from gradcli.results import results_json, save_results
    from gradcli.stages.sweep import check_sweeps, parse_sweep

    id_dataset = parse.one_of(id_dataset, id_alias, "--id-test", "--id")
    if fpr_convention not in CONVENTIONS:
        raise BadInputError(f"--fpr-convention must be one of {', '.join(CONVENTIONS)}")
    sweeps: dict[str, list[float]] = {}
    for text in sweep or []:
        name, values = parse_sweep(text)
        sweeps.setdefault(name, []).extend(values)
    parse.check_alpha(alpha)
    plan = check_sweeps(sweeps)
    methods, embeddings = parse.methods(method), parse.embeddings(embedding, method)
    if report is not None and Path(report).exists() and not Path(report).is_dir():
        raise BadInputError(f"--report {report} is a file; name a folder for the report")
    if results_dir is not None and Path(results_dir).exists() and not Path(results_dir).is_dir():
        raise BadInputError(
            f"--results-dir {results_dir} is a file; name a folder for results.json and results.csv"
        )
    run = common.open_run(
        store,
        device,
        data_root,
        quiet,
        workers,
        memory_budget=memory_budget,
        basis_dtype=basis_dtype,
        on_bad_image=on_bad_image,
    )
    if report is not None:
        check_density_dim(run, density_dim)
    with run.store.restoring_on_failure():
        results = run.evaluate(
            parse.joined(ood),
            id_dataset=id_dataset,
            methods=methods,
            embeddings=embeddings,
            alpha=alpha,
            convention=fpr_convention,
            batch_size=batch_size,
            **detector,
            sweeps=plan,
        )
    saved = save_results(run.store, results, results_dir)
    written = write_report(run, results, report, density_dim=density_dim) if report else []
    preprocess = preprocess_summary(run)
    if as_json:
        document = {**json.loads(results_json(results)), "preprocess": preprocess}
        print(json.dumps({**document, "written": saved}, indent=2))
        return
    if not quiet:
        err.print(
            f"results written to {' and '.join(saved)}"
            if saved
            else f"note: store {store} is read-only: results not saved; pass --results-dir",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    console = common.out()
    for table in results_tables(results, console.width):
        console.print(table)
    if preprocess:
        console.print(f"preprocess: {preprocess['text']}", highlight=False, markup=False)
    for table in sweep_tables(results.sweeps):
        console.print(table)
    if written:
        plotted = any(p.suffix == ".png" for p in written)
        console.print(
            f"wrote the report to {report} ({len(written)} files)"
            + ("" if plotted else "; for plots: pip install 'gradcli[plot]'"),
            highlight=False,
            markup=False,
        )
