"""`gradcli score`: scores of a dataset, OOD flags at a calibrated threshold, exports.

Separate from evaluate: it scores one dataset without ground truth, for use on new data.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table

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
    Shard,
    ShardEnv,
    Store,
    Workers,
    detector_options,
)
from gradcli.errors import BadInputError
from gradcli.stages import defaults


@app.command(
    epilog="Example: gradcli score --dataset places365 --method knn --embedding both "
    "--calibrate-on cifar10:test --tpr 0.95 --export places365.csv"
)
@detector_options("score", before="batch_size")
def score(
    dataset: Annotated[
        str, typer.Option(help="Dataset spec or the name of an embedding in the store.")
    ],
    method: Method = None,
    embedding: Embedding = None,
    alpha: Annotated[
        float, typer.Option(help="Ensemble weight: feature score + alpha * gradient score.")
    ] = defaults.ALPHA,
    calibrate_on: Annotated[
        str | None,
        typer.Option(
            help="Held-out ID data: store the threshold λ that accepts --tpr of it, then flag "
            "every sample scoring below λ as OOD."
        ),
    ] = None,
    tpr: Annotated[
        float | None,
        typer.Option(help="Share of --calibrate-on data accepted as ID at λ (default 0.95)."),
    ] = None,
    export: Annotated[
        str | None,
        typer.Option(
            help="Write one row per input (item, scores, OOD flags) to a .csv/.parquet file, or "
            "to stdout with '-' (CSV; JSON lines with --json)."
        ),
    ] = None,
    batch_size: Batch = None,
    store: Store = DEFAULT_STORE,
    device: Device = DEFAULT_DEVICE,
    data_root: DataRoot = None,
    workers: Workers = None,
    memory_budget: Budget = None,
    on_bad_image: BadImage = DEFAULT_BAD_IMAGE,
    basis_dtype: BasisDtype = DEFAULT_BASIS_DTYPE,
    shard: Shard = None,
    shard_from_env: ShardEnv = None,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
    **detector: Any,
) -> None:
    """Scores (higher = more in-distribution), written to scores/<name>/<method>-<embedding>.

    With a calibrated threshold λ (--calibrate-on, now or before) each score also gets
    per-sample OOD flags (score < λ) in flags/<name>/<method>-<embedding>. With --shard the
    model pass of odin is split; the last shard to finish writes every score.
    """
    from gradcli.export import STDOUT, check_export_path, export_scores, write_rows
    from gradcli.metrics import check_tpr
    from gradcli.overview import preprocess_summary

    part = parse.shard(shard, shard_from_env)
    if part is not None and (export or calibrate_on):
        raise BadInputError(
            "--export and --calibrate-on need every score: run them without --shard once "
            "the shards have finished"
        )

    to_stdout = export == STDOUT
    target = check_export_path(export) if export else None
    parse.check_alpha(alpha)
    if tpr is not None and calibrate_on is None:
        raise BadInputError("--tpr sets the calibration target: give --calibrate-on SPEC too")
    tpr_value = check_tpr(0.95 if tpr is None else tpr)
    methods, embeddings = parse.methods(method), parse.embeddings(embedding, method)
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
    options = {
        "methods": methods,
        "embeddings": embeddings,
        "alpha": alpha,
        "batch_size": batch_size,
        **detector,
    }
    with run.store.restoring_on_failure():
        if calibrate_on:
            run.calibrate(calibrate_on, tpr=tpr_value, **options)
        scores = run.score(dataset, **options, shard=part)
    if part is not None and not scores:
        common.emit(
            {
                "shard": f"{part[0]}/{part[1]}",
                "complete": False,
                "scores": {},
                "preprocess": preprocess_summary(run),
            },
            as_json,
            f"shard {part[0]}/{part[1]} of {dataset} finished; the last shard to finish writes "
            "the scores",
        )
        return
    name = run.embedding_for(dataset)
    flags = run.flags(name, list(scores))
    summary: dict = {}
    for key, values in scores.items():
        summary[key] = {"n": len(values), "mean": float(values.mean()), "std": float(values.std())}
        if key in flags:
            record = run.calibration(key)
            summary[key].update(
                threshold=record["threshold"],
                tpr=record["tpr"],
                calibrated_on=record["dataset"],
                flagged_ood=int(flags[key].sum()),
            )
    if target is not None:
        items = run.item_ids(name)
        if items is None:
            err.print(
                f"note: the images of '{name}' are not at hand; rows are named {name}#<row>",
                highlight=False,
            )
            items = [f"{name}#{row}" for row in range(len(next(iter(scores.values()), [])))]
        if to_stdout:  # the rows alone on stdout, for a pipe
            write_rows(sys.stdout, items, scores, flags, json_lines=as_json)
            return
        export_scores(target, items, scores, flags)
    preprocess = preprocess_summary(run)
    if as_json:
        document = {"scores": summary, "preprocess": preprocess}
        if part is not None:  # the same keys as an unfinished shard's
            document = {
                "shard": f"{part[0]}/{part[1]}",
                "complete": True,
                "scores": summary,
                "preprocess": preprocess,
            }
        common.emit(document, True)
        return
    table = Table(title=f"scores of {dataset}")
    columns = ["score", "n", "mean", "std"] + (["λ", "flagged OOD"] if flags else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "score" else "right")
    for key, s in summary.items():
        row = [key, str(s["n"]), f"{s['mean']:.4g}", f"{s['std']:.4g}"]
        if flags:
            row += (
                [
                    f"{s['threshold']:.4g}",
                    f"{s['flagged_ood']} ({100 * s['flagged_ood'] / max(1, s['n']):.1f}%)",
                ]
                if "threshold" in s
                else ["-", "-"]
            )
        table.add_row(*row)
    common.out().print(table)
    if preprocess:
        common.out().print(f"preprocess: {preprocess['text']}", highlight=False, markup=False)
    if target is not None:
        common.out().print(f"wrote {target}", highlight=False)
