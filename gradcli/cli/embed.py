"""`gradcli embed`: a dataset's reduced gradients, features, logits and labels.

The stage that array jobs share (``--shard``); its summary reports the store's chunk counts.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gradcli.cli import common, parse
from gradcli.cli.app import app
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
    Json,
    Overwrite,
    Quiet,
    Shard,
    ShardEnv,
    Store,
    Workers,
)
from gradcli.stages import defaults


@app.command(
    epilog="Example: gradcli embed --dataset svhn --data-root ~/data --store artifacts/r18  "
    "(array job: add --shard-from-env slurm, or --shard 3/8)"
)
def embed(
    dataset: Annotated[
        str, typer.Option(help="Dataset spec: NAME[:SPLIT], folder:PATH or npz:PATH.")
    ],
    name: Annotated[
        str | None, typer.Option(help="Name in the store (default e.g. cifar10-test).")
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="Embed a seeded random subset of this size.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-samples subset.")] = defaults.SEED,
    chunk_rows: Annotated[
        int, typer.Option(help="Rows per stored chunk: the unit of resuming.")
    ] = defaults.CHUNK_ROWS,
    batch_size: Batch = None,
    overwrite: Overwrite = False,
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
) -> None:
    """Reduced gradients, features, logits and labels of a dataset, in resumable row chunks."""
    part = parse.shard(shard, shard_from_env)
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
    with run.store.restoring_on_failure():
        stored = run.embed(
            dataset,
            name=name,
            batch_size=batch_size,
            max_samples=max_samples,
            seed=seed,
            chunk_rows=chunk_rows,
            overwrite=overwrite,
            shard=part,
        )
    from gradcli.overview import embedding_summary, preprocess_summary

    held = embedding_summary(run, stored)
    summary = {"name": stored, "rows": held["rows"], "k": held["k"], "store": store}
    summary["preprocess"] = preprocess_summary(run)
    if run.skipped:
        summary["skipped"] = run.skipped
    text = f"embedded {held['rows']:,} samples as '{stored}' (K={held['k']}) -> {store}"
    if part is not None:  # every shard reports the same keys, with the store's counts
        n_done, n_chunks = held["chunks_done"], held["chunks"]
        summary.update(
            shard=f"{part[0]}/{part[1]}",
            complete=held["complete"],
            chunks_done=n_done,
            chunks=n_chunks,
        )
        if not held["complete"]:
            text = (
                f"shard {part[0]}/{part[1]} of '{stored}' finished; {n_done}/{n_chunks} chunks "
                "done in all, the last shard to finish completes the embedding"
            )
    common.emit(summary, as_json, common.with_preprocess(text, summary))
