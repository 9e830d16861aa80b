"""`gradcli evaluate`: the metrics of every method against OOD sets, sweeps and reports.

The last stage: runs whatever stage is missing, then saves and prints the results. Given
``--model`` (and ``--weights``), it starts a run too: extract-subspace first, so
``gradcli evaluate --ood places --model resnet50 --weights r50.pt --method avg`` runs
everything on a new store.
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
    METHOD_HELP,
    BadImage,
    BasisDtype,
    Batch,
    Budget,
    DataRoot,
    Debug,
    Device,
    Embedding,
    Json,
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


NEW_RUN = "A new run (extract-subspace first; as its options)"
SUBSPACE_METHODS = ("avg", "pca")  # extract-subspace's --method, also taken by evaluate's


Methods = Annotated[
    list[str] | None,
    typer.Option(
        "--method",
        metavar="NAMES",
        help=f"{METHOD_HELP} With --model, also avg or pca: the subspace's method "
        "(extract-subspace's --method; default avg).",
    ),
]


def _split_methods(values: list[str] | None) -> tuple[list[str] | None, str | None]:
    """``--method``'s score methods and its subspace method (avg or pca, None if not named)."""
    items = parse.joined(values)
    named = list(dict.fromkeys(m for m in items if m in SUBSPACE_METHODS))
    if len(named) > 1:
        raise BadInputError("--method names both subspace methods avg and pca; give one")
    scores = [m for m in items if m not in SUBSPACE_METHODS]
    return scores or None, (named[0] if named else None)


def _check_subspace_method(run: Any, method: str) -> None:
    """Without --model, a subspace method must be the stored subspace's."""
    from gradcli import layout

    stored = (run.store.group_attrs(layout.SUBSPACE).get("provenance") or {}).get("method")
    if stored is not None and stored != method:
        raise BadInputError(
            f"--method {method}: store {run.store.url} holds a subspace made with --method "
            f"{stored}; drop --method {method}, or start over with --model ... --overwrite"
        )


@app.command(
    epilog="Example: gradcli evaluate --ood places --ood textures --sweep k=1,5,10,50 "
    "--report report/ --json  |  a new ImageNet run: gradcli evaluate --ood places "
    "--model resnet50 --weights r50.pt --method avg"
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
    method: Methods = None,
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
    model: Annotated[
        str | None,
        typer.Option(
            help="Start the run with this model when the store has none (or check it is the "
            "store's): architecture name, file.py:factory, module:factory or TorchScript file.",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="With --model: state-dict file or torchvision weights name.",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    id_train: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help="With --model: ID training set of the subspace (default: the store's, else "
            "the model's benchmark: imagenet:train for torchvision names, cifar10:train or "
            "cifar100:train for the CIFAR networks).",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    params: Annotated[
        str | None,
        typer.Option(
            help="With --model: parameter name globs, e.g. 'layer4.*,fc.*'.",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            help="With --model and --method pca: subspace dimension.",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    max_samples: Annotated[
        int | None,
        typer.Option(
            help="With --model: subspace from a seeded random subset of this size.",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    input_size: Annotated[
        str | None,
        typer.Option(
            help="With --model: model input size, N or HxW (default: the model's recipe).",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(
            help="With --model: number of classes, for architectures built by name.",
            rich_help_panel=NEW_RUN,
        ),
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="With --model: a torchvision architecture with untrained weights.",
            rich_help_panel=NEW_RUN,
        ),
    ] = False,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoint",
            help="With --model: allow full unpickling of the checkpoint.",
            rich_help_panel=NEW_RUN,
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="With --model: start the run over when the store holds another model or subspace.",
            rich_help_panel=NEW_RUN,
        ),
    ] = False,
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
    """FPR95, AUROC, AUPR-In and AUPR-Out of every method, running any missing stage first.

    With --model (and --weights) it runs extract-subspace first, on a new store too, reusing a
    stored subspace made the same way (--method avg or pca is then the subspace's method; the
    other --method names are scores).
    """
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
    score_methods, subspace_method = _split_methods(method)
    methods = parse.methods(score_methods)
    embeddings = parse.embeddings(embedding, score_methods)
    new_run = {
        "--weights": weights,
        "--id-train": id_train,
        "--params": params,
        "--k": k,
        "--max-samples": max_samples,
        "--input-size": input_size,
        "--num-classes": num_classes,
        "--random-weights": random_weights or None,
        "--trust-checkpoint": trust_checkpoint or None,
        "--overwrite": overwrite or None,
    }
    given = [flag for flag, value in new_run.items() if value is not None]
    if model is None and given:
        raise BadInputError(
            f"{', '.join(given)} start a new run and need --model; add --model NAME, or "
            f"drop {'them' if len(given) > 1 else 'it'} to evaluate the store's run"
        )
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
        create=model is not None,
        memory_budget=memory_budget,
        basis_dtype=basis_dtype,
        on_bad_image=on_bad_image,
    )
    with run.store.restoring_on_failure():
        if model is not None:
            _start(run, model, weights, subspace_method, new_run, batch_size, quiet)
        elif subspace_method is not None:
            _check_subspace_method(run, subspace_method)
        if report is not None:
            check_density_dim(run, density_dim)
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


def _start(
    run: Any,
    model: str,
    weights: str | None,
    method: str | None,
    given: dict[str, Any],
    batch_size: int | None,
    quiet: bool,
) -> None:
    """extract-subspace's part of ``evaluate --model``: the model, then its subspace (reused
    when the store holds it), said in one line on stderr."""
    from gradcli.stages.evaluate import ensure_subspace

    summary = ensure_subspace(
        run,
        model,
        weights,
        id_train=given["--id-train"],
        method=method or "avg",
        k=given["--k"],
        params=parse.csv_items(given["--params"]),
        max_samples=given["--max-samples"],
        batch_size=batch_size,
        overwrite=bool(given["--overwrite"]),
        input_size=parse.input_size(given["--input-size"]),
        num_classes=given["--num-classes"],
        random_weights=bool(given["--random-weights"]),
        trust_checkpoint=bool(given["--trust-checkpoint"]),
    )
    if not quiet:
        err.print(
            f"subspace {summary['method']} K={summary['k']} over "
            f"{summary['num_parameters']:,} parameters of {model} from {summary['samples']:,} "
            f"images of {summary['id_train']}"
            + (" [reused from store]" if summary["reused"] else ""),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
