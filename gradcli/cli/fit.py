"""`gradcli fit-head`: train the BN→FC head and fit every detector.

Its head and detector flags are not written out here: they come from the one declaration
of each option (:class:`gradcli.head.HeadOptions`, :data:`gradcli.scores.options.OPTIONS`).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gradcli.cli import common
from gradcli.cli.app import app
from gradcli.cli.options import (
    DEFAULT_BAD_IMAGE,
    DEFAULT_BASIS_DTYPE,
    DEFAULT_DEVICE,
    DEFAULT_STORE,
    HEAD_FLAGS,
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
    Store,
    Workers,
    detector_options,
    head_options,
    head_parameter,
)


@app.command("fit-head", epilog="Example: gradcli fit-head --store artifacts/r18")
@detector_options("fit", before="batch_size")
@head_options(before="batch_size")
def fit_head(
    train: Annotated[
        str | None, typer.Option(help="ID training set (default: the subspace's).")
    ] = None,
    test: Annotated[
        str | None, typer.Option("--id-test", help="ID test set for the accuracy report.")
    ] = None,
    batch_size: Batch = None,
    overwrite: Overwrite = False,
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
    **options: Any,
) -> None:
    """Train the BN→FC head on ID training gradients and fit every detector."""
    from gradcli.head import HeadOptions
    from gradcli.overview import preprocess_summary
    from gradcli.scores.options import FIT_OPTIONS, DetectorOptions

    head = HeadOptions(**{field: options[head_parameter(field)] for field in HEAD_FLAGS})
    detectors = DetectorOptions(**{option.name: options[option.name] for option in FIT_OPTIONS})
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
        summary = run.fit_head(
            train=train,
            test=test,
            head=head,
            detectors=detectors,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    train_acc = 100 * summary["train_accuracy"]
    text = f"head trained on '{summary['train']}': train accuracy {train_acc:.2f}%"
    if "test_accuracy" in summary:
        text += (
            f", ID test accuracy {100 * summary['test_accuracy']:.2f}% on '{summary['test']}' "
            f"(model: {100 * summary['model_test_accuracy']:.2f}%)"
        )
    summary["preprocess"] = preprocess_summary(run)
    common.emit(summary, as_json, common.with_preprocess(text, summary))
