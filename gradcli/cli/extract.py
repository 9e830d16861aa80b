"""`gradcli extract-subspace`: the model, its gradient statistics and the subspace basis.

The first stage, and the only command that sets the run's model: its many model and
preprocessing options are its own.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gradcli.cli import common, parse
from gradcli.cli.app import app
from gradcli.cli.options import (
    DEFAULT_BAD_IMAGE,
    DEFAULT_DEVICE,
    DEFAULT_STORE,
    BadImage,
    Batch,
    Budget,
    DataRoot,
    Debug,
    Device,
    Json,
    Overwrite,
    Quiet,
    Store,
    Workers,
)
from gradcli.stages import defaults


@app.command(
    "extract-subspace",
    epilog="Example: gradcli extract-subspace --model cifar_resnet18 "
    "--weights r18.pt --dataset cifar10:train --data-root ~/data --store artifacts/r18  "
    "(on N processes: torchrun --nproc-per-node N -m gradcli extract-subspace ...)",
)
def extract_subspace(
    model: Annotated[
        str,
        typer.Option(
            help="Architecture name, file.py:factory, module:factory or TorchScript file."
        ),
    ],
    dataset: Annotated[str, typer.Option(help="ID training set spec, e.g. cifar10:train.")],
    weights: Annotated[
        str | None, typer.Option(help="State-dict file or torchvision weights name.")
    ] = None,
    method: Annotated[
        str, typer.Option(help="Subspace: avg (class-average gradients) or pca.")
    ] = "avg",
    k: Annotated[
        int | None,
        typer.Option(
            "--k", help="Subspace dimension (pca: required; avg: always classes - 1, leave out)."
        ),
    ] = None,
    oversample: Annotated[
        int, typer.Option(help="PCA: extra columns p of the block.")
    ] = defaults.PCA_OVERSAMPLE,
    iterations: Annotated[
        int, typer.Option(help="PCA: subspace iterations T.")
    ] = defaults.PCA_ITERATIONS,
    checkpoint_every: Annotated[
        int,
        typer.Option(help="Save the statistics' and PCA's progress every this many batches."),
    ] = defaults.CHECKPOINT_EVERY,
    iteration_dtype: Annotated[
        str,
        typer.Option(
            help="PCA: precision of the iterations' products: auto (bfloat16 where the device "
            "has native bf16), float32 or bfloat16; the final Rayleigh-Ritz pass is float32."
        ),
    ] = "auto",
    params: Annotated[
        str | None, typer.Option(help="Parameter name globs, e.g. 'layer4.*,fc.*'.")
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="Use a seeded random subset of this size.")
    ] = None,
    no_variance: Annotated[
        bool, typer.Option("--no-variance", help="Do not divide by the gradient std.")
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed of the --max-samples subset and PCA start.")
    ] = defaults.SEED,
    feature_layer: Annotated[
        str | None, typer.Option(help="Module whose input is the feature vector.")
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights", help="Run a torchvision architecture with untrained weights."
        ),
    ] = False,
    input_size: Annotated[
        str | None,
        typer.Option(
            help="Model input size, N or HxW (default: the model's recipe; user models take "
            "images at their stored size)."
        ),
    ] = None,
    resize: Annotated[
        int | None,
        typer.Option(help="Resize the shorter side to N, then centre-crop to --input-size."),
    ] = None,
    resize_rounding: Annotated[
        str,
        typer.Option(
            help="Resized pixels: uint8 (rounded to 8 bits as torchvision's PIL Resize + "
            "ToTensor) or float (unrounded interpolation)."
        ),
    ] = "uint8",
    mean: Annotated[str | None, typer.Option(help="Per-channel mean, comma-separated.")] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std, comma-separated.")] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Number of classes, for architectures built by name.")
    ] = None,
    trust_checkpoint: Annotated[
        bool, typer.Option("--trust-checkpoint", help="Allow full unpickling of the checkpoint.")
    ] = False,
    batch_size: Batch = None,
    overwrite: Overwrite = False,
    store: Store = DEFAULT_STORE,
    device: Device = DEFAULT_DEVICE,
    data_root: DataRoot = None,
    workers: Workers = None,
    memory_budget: Budget = None,
    on_bad_image: BadImage = DEFAULT_BAD_IMAGE,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Gradient statistics (mean, variance) and the subspace basis from ID training data.

    Under torchrun (WORLD_SIZE, RANK set) every rank passes over a slice of the data, sums are
    all-reduced (gloo on CPU, nccl on CUDA) and rank 0 alone writes the store and prints.
    """
    from gradcli.distributed import from_env
    from gradcli.run import check_extract_options

    check_extract_options(  # before the store, the model or the data is touched
        method=method,
        k=k,
        oversample=oversample,
        iterations=iterations,
        checkpoint_every=checkpoint_every,
        iteration_dtype=iteration_dtype,
        batch_size=batch_size,
        seed=seed,
        max_samples=max_samples,
    )
    group = from_env(device)
    try:
        run = common.open_run(
            store,
            device,
            data_root,
            quiet,
            workers,
            create=True,
            memory_budget=memory_budget,
            on_bad_image=on_bad_image,
            group=group,
        )
        with run.store.restoring_on_failure():
            loaded = run.set_model(
                model,
                weights,
                feature_layer=feature_layer,
                input_size=parse.input_size(input_size),
                mean=parse.floats(mean, "--mean"),
                std=parse.floats(std, "--std"),
                num_classes=num_classes,
                trust_checkpoint=trust_checkpoint,
                overwrite=overwrite,
                resize=resize,
                resize_rounding=resize_rounding,
                random_weights=random_weights,
            )
            summary = run.extract_subspace(
                dataset,
                method=method,
                k=k,
                params=parse.csv_items(params),
                max_samples=max_samples,
                no_variance=no_variance,
                batch_size=batch_size,
                seed=seed,
                oversample=oversample,
                iterations=iterations,
                checkpoint_every=checkpoint_every,
                iteration_dtype=iteration_dtype,
                overwrite=overwrite,
            )
        summary.update(store=store, model=loaded.spec, classes=loaded.num_classes)
        summary["preprocess"] = loaded.preprocess.summary()
        if loaded.random_weights:
            summary["random_weights"] = True
        if run.skipped:  # unreadable images left out under --on-bad-image skip
            summary["skipped"] = run.skipped
        text = (
            f"subspace {summary['method']} K={summary['k']} over {summary['num_parameters']:,} "
            f"parameters from {summary['samples']:,} samples"
            + (
                f" ({summary['variance_replaced']} zero-variance entries replaced)"
                if not no_variance
                else " (no variance scaling)"
            )
            + (" [reused from store]" if summary["reused"] else "")
            + f" -> {store}"
            + (f"\n{summary['k_reason']}" if summary["method"] == "avg" else "")
        )
        if loaded.random_weights:
            text += "\nnote: untrained (random) weights, as --random-weights asked"
        text = common.with_preprocess(text, summary)
        if group.is_writer:
            common.emit(summary, as_json, text)
    finally:
        group.close()
