"""The gradcli command line: parses options, calls :mod:`gradcli.run`, reports.

Errors a user can fix print one line on stderr and exit with the code documented in the
README (2 bad input, 3 stale store, 130 interrupted); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from gradcli import __version__
from gradcli.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    BadInputError,
    GradcliError,
    Interrupted,
)

STORE_ENV = "GRADCLI_STORE"
STORAGE_OPTIONS_ENV = "GRADCLI_STORAGE_OPTIONS"  # JSON object for the fsspec filesystem
DEFAULT_STORE = "artifacts/default"

app = typer.Typer(
    name="gradcli",
    help="Out-of-distribution detection with low-dimensional gradients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)

# Typer (0.29 on) raises its own exceptions and no longer depends on click.
USAGE_ERRORS = (TyperException,)
STOPS = (KeyboardInterrupt, typer.Abort)


def _out() -> Console:
    """Console for results on stdout; wide when piped, so tables stay one row per method."""
    return Console() if sys.stdout.isatty() else Console(width=240)


StoreOpt = Annotated[
    str,
    typer.Option(
        "--store", envvar=STORE_ENV, help="Run store: a directory or fsspec URL (Zarr v3 group)."
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="Torch device: cpu, cuda or cuda:N.")]
DataRootOpt = Annotated[
    str | None,
    typer.Option(help="Folder holding the benchmark datasets (env GRADCLI_DATA_ROOT)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="DataLoader worker processes (default: some for image folders, 0 for arrays)."
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(help="Memory budget, e.g. 8G (default: half the available RAM)."),
]
BadImageOpt = Annotated[
    str, typer.Option(help="fail (default) or skip: what to do with an unreadable image.")
]
BasisDtypeOpt = Annotated[
    str, typer.Option(help="Basis precision in memory: float32 or bfloat16 (half the memory).")
]
BatchOpt = Annotated[
    int | None, typer.Option(help="Images per gradient batch (default: from memory).")
]
OdinTemperatureOpt = Annotated[
    float, typer.Option(help="ODIN temperature T (odin runs only when named in --method).")
]
OdinEpsilonOpt = Annotated[
    float, typer.Option(help="ODIN input perturbation ε, in [0, 1] pixel units.")
]
METHOD_HELP = (
    "msp, energy, maxlogit, react, bats, maha, knn, vim, gradnorm, residual, gnorm, odin, "
    "ensemble or all (comma-separated or repeated; all = every method but odin, which needs "
    "the images)."
)
MethodOpt = Annotated[list[str] | None, typer.Option(metavar="NAMES", help=METHOD_HELP)]
EmbeddingOpt = Annotated[
    list[str] | None,
    typer.Option(
        metavar="KINDS",
        help="grad, feat or both (both adds the ensemble; comma-separated or repeated) "
        "[default: both].",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        help="Compute only shard I of N (I/N, 0-based) of the rows; N processes started at "
        "once on one store fill it together."
    ),
]
ShardEnvOpt = Annotated[
    str | None,
    typer.Option(
        help="Take I and N from the environment: 'slurm' (SLURM_ARRAY_TASK_ID, "
        "SLURM_ARRAY_TASK_COUNT) or two variable names ID_VAR,COUNT_VAR."
    ),
]


def _shard(shard: str | None, shard_from_env: str | None) -> tuple[int, int] | None:
    from gradcli.distributed import parse_shard, torchrun_shard
    from gradcli.distributed import shard_from_env as from_env

    if shard is not None and shard_from_env is not None:
        raise BadInputError("give --shard or --shard-from-env, not both")
    if shard is not None:
        return parse_shard(shard)
    if shard_from_env is not None:
        return from_env(None if shard_from_env.lower() == "slurm" else shard_from_env)
    return torchrun_shard()  # under torchrun: one shard per rank


OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Recompute this stage even if the store holds another version."
    ),
]


def _csv(values: str | None) -> list[str] | None:
    if values is None:
        return None
    items = [v.strip() for v in values.split(",") if v.strip()]
    return items or None


def _floats(values: str | None, option: str) -> list[float] | None:
    items = _csv(values)
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise BadInputError(f"{option} takes comma-separated numbers, got '{values}'") from None


def _input_size(value: str | None) -> int | tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().replace("x", ",").split(",")]
    except ValueError:
        raise BadInputError(f"--input-size takes N or HxW, got '{value}'") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise BadInputError(f"--input-size takes N or HxW, got '{value}'")


class StopRequests:
    """SIGINT/SIGTERM ask the running stage to stop at its next chunk boundary.

    A second SIGINT stops at once (the default handler's KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            if err.is_terminal:  # someone at a terminal sees it was heard; pipelines get one line
                again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
                err.print(
                    f"{signal.Signals(signum).name}: stopping at the next chunk boundary{again}",
                    highlight=False,
                )

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)


def _open_run(
    store: str,
    device: str,
    data_root: str | None,
    quiet: bool,
    workers: int | None,
    create: bool = False,
    memory_budget: str | None = None,
    basis_dtype: str = "float32",
    on_bad_image: str = "fail",
    group=None,
):
    from gradcli.progress import NullProgress, RichProgress
    from gradcli.run import Run

    quiet = quiet or (group is not None and not group.is_writer)  # one progress bar per job
    progress = NullProgress() if quiet else RichProgress(err)
    stop = StopRequests()
    stop.install()
    return Run(
        store,
        device=device,
        data_root=data_root,
        progress=progress,
        num_workers=workers,
        create=create,
        memory_budget=memory_budget or None,
        basis_dtype=basis_dtype,
        on_bad_image=on_bad_image,
        should_stop=stop,
        group=group,
        storage_options=_storage_options(),
    )


def _storage_options() -> dict | None:
    text = os.environ.get(STORAGE_OPTIONS_ENV)
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInputError(f"{STORAGE_OPTIONS_ENV} is not valid JSON ({error})") from None
    if not isinstance(options, dict):
        raise BadInputError(f'{STORAGE_OPTIONS_ENV} must be a JSON object, e.g. {{"anon": true}}')
    return options


def _emit(summary: dict, as_json: bool, text: str | None = None) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    elif text:
        _out().print(text, highlight=False)


def _preprocess(run) -> dict | None:
    """The store model's preprocessing for a summary: its fields and a one-line ``text``."""
    from gradcli.config import Preprocess

    record = (run.store.attrs.get("model") or {}).get("preprocess")
    return Preprocess.from_dict(record).summary() if record else None


def _with_preprocess(text: str, summary: dict) -> str:
    entry = summary.get("preprocess")
    return f"{text}\npreprocess: {entry['text']}" if entry else text


def _check_alpha(alpha: float) -> None:
    """Checked first: a calibration stored with another α would otherwise be named instead."""
    if not math.isfinite(alpha):
        raise BadInputError(f"--alpha must be a finite number, not {alpha}")


def _one_of(value, alias, name: str, alias_name: str):
    """The value of an option or of its hidden old name, refusing both."""
    if value is not None and alias is not None:
        raise BadInputError(f"{name} and {alias_name} name the same option; give it once")
    return alias if value is None else value


def _joined(values: list[str] | None) -> list[str]:
    """The items of a repeatable option, each occurrence also split at commas."""
    return [item for value in values or [] for item in _csv(value) or []]


def _methods(value: list[str] | None) -> list[str]:
    """Method names from --method; "all" is every embedding-based method (odin only by name)."""
    from gradcli.scores import METHODS, resolve_methods

    items = _joined(value) or ["all"]
    unknown = [m for m in items if m not in (*METHODS, "ensemble", "all")]
    if unknown:
        raise BadInputError(
            f"unknown --method {', '.join(unknown)}; choose from {', '.join(METHODS)}, "
            "ensemble or all (see gradcli methods)"
        )
    return resolve_methods([m for m in items if m != "ensemble"])  # ensemble: an embedding


def _embeddings(value: list[str] | None, methods_value: list[str] | None) -> list[str]:
    """Embedding kinds from --embedding (default both) and an 'ensemble' named in --method."""
    choices = {"grad": ["grad"], "feat": ["feat"], "both": ["grad", "feat", "ensemble"]}
    items = _joined(value) or ["both"]
    wrong = [item for item in items if item not in choices]
    if wrong:
        raise BadInputError(f"--embedding must be grad, feat or both, not '{wrong[0]}'")
    kinds = list(dict.fromkeys(kind for item in items for kind in choices[item]))
    if "ensemble" in _joined(methods_value):
        return ["ensemble"] if items == ["both"] else list(dict.fromkeys([*kinds, "ensemble"]))
    return kinds


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
    oversample: Annotated[int, typer.Option(help="PCA: extra columns p of the block.")] = 10,
    iterations: Annotated[int, typer.Option(help="PCA: subspace iterations T.")] = 4,
    checkpoint_every: Annotated[
        int,
        typer.Option(help="Save the statistics' and PCA's progress every this many batches."),
    ] = 50,
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
    seed: Annotated[int, typer.Option(help="Seed of the --max-samples subset and PCA start.")] = 0,
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
    batch_size: BatchOpt = None,
    overwrite: OverwriteOpt = False,
    store: StoreOpt = DEFAULT_STORE,
    device: DeviceOpt = "cpu",
    data_root: DataRootOpt = None,
    workers: WorkersOpt = None,
    memory_budget: BudgetOpt = None,
    on_bad_image: BadImageOpt = "fail",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
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
        run = _open_run(
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
                input_size=_input_size(input_size),
                mean=_floats(mean, "--mean"),
                std=_floats(std, "--std"),
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
                params=_csv(params),
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
        text = _with_preprocess(text, summary)
        if group.is_writer:
            _emit(summary, as_json, text)
    finally:
        group.close()


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
    seed: Annotated[int, typer.Option(help="Seed of the --max-samples subset.")] = 0,
    chunk_rows: Annotated[
        int, typer.Option(help="Rows per stored chunk: the unit of resuming.")
    ] = 512,
    batch_size: BatchOpt = None,
    overwrite: OverwriteOpt = False,
    store: StoreOpt = DEFAULT_STORE,
    device: DeviceOpt = "cpu",
    data_root: DataRootOpt = None,
    workers: WorkersOpt = None,
    memory_budget: BudgetOpt = None,
    on_bad_image: BadImageOpt = "fail",
    basis_dtype: BasisDtypeOpt = "float32",
    shard: ShardOpt = None,
    shard_from_env: ShardEnvOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Reduced gradients, features, logits and labels of a dataset, in resumable row chunks."""
    part = _shard(shard, shard_from_env)
    run = _open_run(
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
    shape = run.store.shape(f"embed/{stored}/grad")
    complete = run.store.stage_complete(f"embed/{stored}")
    summary = {"name": stored, "rows": shape[0], "k": shape[1], "store": store}
    summary["preprocess"] = _preprocess(run)
    if run.skipped:
        summary["skipped"] = run.skipped
    text = f"embedded {shape[0]:,} samples as '{stored}' (K={shape[1]}) -> {store}"
    if part is not None:  # every shard reports the same keys, with the store's counts
        done = run.store.read(f"embed/{stored}/done")
        n_done = int(done.sum())
        summary.update(
            shard=f"{part[0]}/{part[1]}", complete=complete, chunks_done=n_done, chunks=len(done)
        )
        if not complete:
            text = (
                f"shard {part[0]}/{part[1]} of '{stored}' finished; {n_done}/{len(done)} chunks "
                "done in all, the last shard to finish completes the embedding"
            )
    _emit(summary, as_json, _with_preprocess(text, summary))


@app.command("fit-head", epilog="Example: gradcli fit-head --store artifacts/r18")
def fit_head(
    train: Annotated[
        str | None, typer.Option(help="ID training set (default: the subspace's).")
    ] = None,
    test: Annotated[
        str | None, typer.Option("--id-test", help="ID test set for the accuracy report.")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Head training epochs (default: enough for --min-steps, at least 10)."),
    ] = None,
    min_steps: Annotated[
        int, typer.Option(help="Head: fewest SGD steps when --epochs is not given.")
    ] = 2000,
    lr: Annotated[float, typer.Option(help="SGD learning rate (decayed to 0 on a cosine).")] = 0.1,
    head_batch_size: Annotated[int, typer.Option(help="Head training batch size.")] = 128,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay.")] = 1e-2,
    seed: Annotated[int, typer.Option(help="Seed of the head's initialisation and shuffling.")] = 0,
    react_percentile: Annotated[float, typer.Option(help="ReAct clipping percentile.")] = 90.0,
    bats_lambda: Annotated[float, typer.Option(help="BATS truncation width λ.")] = 1.0,
    clip_dims: Annotated[
        int | None,
        typer.Option(
            help="ReAct/BATS: rectify the last d dims (default: K // 2 on gradients under the "
            "paper rule, else all)."
        ),
    ] = None,
    clip_rule: Annotated[
        str,
        typer.Option(
            help="ReAct/BATS on gradients: paper (last d dims, one pooled ReAct threshold) or "
            "per-dim (each dim at its own percentile, all dims)."
        ),
    ] = "paper",
    knn_k: Annotated[
        int, typer.Option(help="KNN: the k-th neighbour's distance is the score.")
    ] = 50,
    knn_normalise: Annotated[
        bool,
        typer.Option(
            "--knn-normalise/--no-knn-normalise",
            help="KNN: L2-normalise embeddings before the neighbour search [default: normalise].",
        ),
    ] = True,
    temperature: Annotated[float, typer.Option(help="Energy temperature T.")] = 1.0,
    vim_dim: Annotated[
        int | None,
        typer.Option(help="ViM principal dimension (default: 1000, 512 or half the features)."),
    ] = None,
    gradnorm_temperature: Annotated[float, typer.Option(help="GradNorm temperature T.")] = 1.0,
    batch_size: BatchOpt = None,
    overwrite: OverwriteOpt = False,
    store: StoreOpt = DEFAULT_STORE,
    device: DeviceOpt = "cpu",
    data_root: DataRootOpt = None,
    workers: WorkersOpt = None,
    memory_budget: BudgetOpt = None,
    on_bad_image: BadImageOpt = "fail",
    basis_dtype: BasisDtypeOpt = "float32",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train the BN→FC head on ID training gradients and fit every detector."""
    from gradcli.head import HeadOptions
    from gradcli.scores.options import DetectorOptions

    head = HeadOptions(
        epochs=epochs,
        lr=lr,
        batch_size=head_batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        min_steps=min_steps,
    )
    detectors = DetectorOptions(
        react_percentile=react_percentile,
        bats_lambda=bats_lambda,
        clip_dims=clip_dims,
        knn_k=knn_k,
        temperature=temperature,
        vim_dim=vim_dim,
        gradnorm_temperature=gradnorm_temperature,
        knn_normalise=knn_normalise,
        clip_rule=clip_rule,
    )
    run = _open_run(
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
    summary["preprocess"] = _preprocess(run)
    _emit(summary, as_json, _with_preprocess(text, summary))


@app.command(
    epilog="Example: gradcli score --dataset places --method knn --embedding both "
    "--calibrate-on cifar10:test --tpr 0.95 --export places.csv"
)
def score(
    dataset: Annotated[
        str, typer.Option(help="Dataset spec or the name of an embedding in the store.")
    ],
    method: MethodOpt = None,
    embedding: EmbeddingOpt = None,
    alpha: Annotated[
        float, typer.Option(help="Ensemble weight: feature score + alpha * gradient score.")
    ] = 1.0,
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
    odin_temperature: OdinTemperatureOpt = 1000.0,
    odin_epsilon: OdinEpsilonOpt = 0.0014,
    batch_size: BatchOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    device: DeviceOpt = "cpu",
    data_root: DataRootOpt = None,
    workers: WorkersOpt = None,
    memory_budget: BudgetOpt = None,
    on_bad_image: BadImageOpt = "fail",
    basis_dtype: BasisDtypeOpt = "float32",
    shard: ShardOpt = None,
    shard_from_env: ShardEnvOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Scores (higher = more in-distribution), written to scores/<name>/<method>-<embedding>.

    With a calibrated threshold λ (--calibrate-on, now or before) each score also gets
    per-sample OOD flags (score < λ) in flags/<name>/<method>-<embedding>. With --shard the
    model pass of odin is split; the last shard to finish writes every score.
    """
    from gradcli.export import STDOUT, check_export_path, export_scores, write_rows
    from gradcli.metrics import check_tpr

    part = _shard(shard, shard_from_env)
    if part is not None and (export or calibrate_on):
        raise BadInputError(
            "--export and --calibrate-on need every score: run them without --shard once "
            "the shards have finished"
        )

    to_stdout = export == STDOUT
    target = check_export_path(export) if export else None
    _check_alpha(alpha)
    if tpr is not None and calibrate_on is None:
        raise BadInputError("--tpr sets the calibration target: give --calibrate-on SPEC too")
    tpr_value = check_tpr(0.95 if tpr is None else tpr)
    methods, embeddings = _methods(method), _embeddings(embedding, method)
    run = _open_run(
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
        "odin_temperature": odin_temperature,
        "odin_epsilon": odin_epsilon,
    }
    with run.store.restoring_on_failure():
        if calibrate_on:
            run.calibrate(calibrate_on, tpr=tpr_value, **options)
        scores = run.score(dataset, **options, shard=part)
    if part is not None and not scores:
        _emit(
            {
                "shard": f"{part[0]}/{part[1]}",
                "complete": False,
                "scores": {},
                "preprocess": _preprocess(run),
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
    preprocess = _preprocess(run)
    if as_json:
        document = {"scores": summary, "preprocess": preprocess}
        if part is not None:  # the same keys as an unfinished shard's
            document = {
                "shard": f"{part[0]}/{part[1]}",
                "complete": True,
                "scores": summary,
                "preprocess": preprocess,
            }
        _emit(document, True)
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
    _out().print(table)
    if preprocess:
        _out().print(f"preprocess: {preprocess['text']}", highlight=False, markup=False)
    if target is not None:
        _out().print(f"wrote {target}", highlight=False)


@app.command(
    epilog="Example: gradcli evaluate --ood places --ood textures --sweep k=1,5,10,50 "
    "--report report/ --json"
)
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
    method: MethodOpt = None,
    embedding: EmbeddingOpt = None,
    alpha: Annotated[float, typer.Option(help="Ensemble weight α.")] = 1.0,
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
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PARAM=VALUES",
            help="PARAMETER=V1,V2,... over stored embeddings: k (knn), percentile (react), "
            "lambda (bats), temperature (energy), d (clipped dims); repeat for several.",
        ),
    ] = None,
    odin_temperature: OdinTemperatureOpt = 1000.0,
    odin_epsilon: OdinEpsilonOpt = 0.0014,
    batch_size: BatchOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    device: DeviceOpt = "cpu",
    data_root: DataRootOpt = None,
    workers: WorkersOpt = None,
    memory_budget: BudgetOpt = None,
    on_bad_image: BadImageOpt = "fail",
    basis_dtype: BasisDtypeOpt = "float32",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """FPR95, AUROC, AUPR-In and AUPR-Out of every method, running any missing stage first."""
    from gradcli.metrics import CONVENTIONS
    from gradcli.report import (
        check_density_dim,
        results_json,
        results_tables,
        sweep_tables,
        write_report,
    )
    from gradcli.sweep import check_sweeps, parse_sweep

    id_dataset = _one_of(id_dataset, id_alias, "--id-test", "--id")
    if fpr_convention not in CONVENTIONS:
        raise BadInputError(f"--fpr-convention must be one of {', '.join(CONVENTIONS)}")
    sweeps: dict[str, list[float]] = {}
    for text in sweep or []:
        name, values = parse_sweep(text)
        sweeps.setdefault(name, []).extend(values)
    _check_alpha(alpha)
    plan = check_sweeps(sweeps)
    methods, embeddings = _methods(method), _embeddings(embedding, method)
    if report is not None and Path(report).exists() and not Path(report).is_dir():
        raise BadInputError(f"--report {report} is a file; name a folder for the report")
    if results_dir is not None and Path(results_dir).exists() and not Path(results_dir).is_dir():
        raise BadInputError(
            f"--results-dir {results_dir} is a file; name a folder for results.json and results.csv"
        )
    run = _open_run(
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
            _joined(ood),
            id_dataset=id_dataset,
            methods=methods,
            embeddings=embeddings,
            alpha=alpha,
            convention=fpr_convention,
            batch_size=batch_size,
            odin_temperature=odin_temperature,
            odin_epsilon=odin_epsilon,
            sweeps=plan,
        )
    saved = _write_results(results, results_dir, store, run.store)
    written = write_report(run, results, report, density_dim=density_dim) if report else []
    preprocess = _preprocess(run)
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
    console = _out()
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


@app.command(epilog="Example: gradcli methods --json")
def methods(
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The OOD scores gradcli knows: embeddings, options, what they need, and their papers."""
    from gradcli.scores import describe_methods

    rows = describe_methods()
    if as_json:
        _emit({"methods": rows}, True)
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
    _out().print(table)


def _write_results(results, results_dir, store, run_store=None) -> list[str]:
    """results.json and results.csv into ``--results-dir`` or else the store itself (a local
    folder or an object-store URL alike); returns the files written, [] on a read-only store
    without ``--results-dir``.

    Results already there for the same ID set and FPR convention are merged with these by
    (method, embedding, OOD set), the newer replacing the older, so that a run on fewer OOD
    sets adds to the file instead of truncating it; averages are taken over the merged sets."""
    from gradcli.report import merge_results, records_csv, results_json
    from gradcli.store import RunStore

    def as_csv(document: str) -> str:
        return records_csv(json.loads(document)["results"])

    try:
        if results_dir is None:
            if run_store is None:
                run_store = RunStore(store, create=False, storage_options=_storage_options())
            if run_store.read_only:
                return []
            document = merge_results(run_store.read_text("results.json"), results_json(results))
            return [
                run_store.write_text("results.json", document),
                run_store.write_text("results.csv", as_csv(document)),
            ]
        target = Path(results_dir)
        target.mkdir(parents=True, exist_ok=True)
        old = target / "results.json"
        document = merge_results(old.read_text() if old.is_file() else None, results_json(results))
        (target / "results.json").write_text(document)
        (target / "results.csv").write_text(as_csv(document))
        return [str(target / "results.json"), str(target / "results.csv")]
    except BadInputError:
        raise
    except Exception as error:  # OSError locally; fsspec backends raise their own types
        where = results_dir if results_dir is not None else store
        fix = "pass another --results-dir" if results_dir is not None else "pass --results-dir"
        raise BadInputError(f"cannot write results to {where}: {error}; {fix}") from None


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
    store: StoreOpt = DEFAULT_STORE,
    device: DeviceOpt = "cpu",
    data_root: DataRootOpt = None,
    workers: WorkersOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """What the store holds: stages, shapes, completion, config, spectrum, reconstruction error."""
    from gradcli.overview import describe, plot_spectrum

    run = _open_run(store, device, data_root, quiet, workers)
    with run.store.restoring_on_failure():
        for spec in dataset or []:
            run.embed(spec)
    report = describe(run)
    if plot:
        report["plots"] = [str(p) for p in plot_spectrum(report, plot)]
    if as_json:
        _emit(report, True)
        return
    console = _out()
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
    data_root: DataRootOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The dataset names gradcli knows, the layout each expects and whether it is found."""
    from gradcli.data import DATA_ROOT_ENV, list_datasets

    rows = list_datasets(data_root or os.environ.get(DATA_ROOT_ENV))
    if as_json:
        _emit({"datasets": rows}, True)
        return
    table = Table(title="datasets")
    for column in ("name", "kind", "found", "splits", "layout"):
        table.add_column(column)
    for row in rows:
        found = "[green]yes[/]" if row["found"] else "[dim]no[/]"
        table.add_row(
            row["name"], row["kind"], found, ",".join(row.get("splits", [])), row["layout"]
        )
    _out().print(table)


@app.command(epilog="Example: gradcli demo")
def demo(
    store: Annotated[
        str, typer.Option(help="Run store of the demo (a local folder).")
    ] = "artifacts/demo",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The built-in offline benchmark: a small CNN on MNIST digits against every offline OOD set."""
    from gradcli.demo import ID_TEST, ID_TRAIN, run_demo, skipped_ood_sets
    from gradcli.progress import NullProgress, RichProgress
    from gradcli.report import results_json, results_tables

    progress = NullProgress() if quiet else RichProgress(err)
    skipped = skipped_ood_sets()
    results = run_demo(store, progress=progress)
    folder = Path(store).resolve()
    written = [str(folder / Path(path).name) for path in _write_results(results, None, store)]
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
    console = _out()
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
def version(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Print gradcli's version."""
    _emit({"version": __version__}, as_json, __version__)


# Hidden old spellings of an option, counted with the option itself ("given twice").
ALIASES = {"--id": "--id-test"}


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Out-of-distribution detection with low-dimensional gradients."""


_COMMAND = None


def _command():
    """The app's command tree (built once), with help that shows no value for a flag and a
    name instead of a Python type for options that take several values."""
    global _COMMAND
    if _COMMAND is None:
        root = typer.main.get_command(app)
        for command in [root, *getattr(root, "commands", {}).values()]:
            context = command.make_context(command.name or "gradcli", [], resilient_parsing=True)
            for param in command.get_params(context):
                if getattr(param, "is_flag", False):
                    param.metavar = ""
                elif getattr(param, "multiple", False) and param.metavar is None:
                    param.metavar = "TEXT"
        _COMMAND = root
    return _COMMAND


def _check_repeats(root, args: list[str]) -> None:
    """Refuse an option given twice unless it takes several values (a list option): the last
    one would otherwise silently win. A flag given twice alike (``--quiet -q``) says the same
    thing twice and is let through; a flag and its negation are refused."""
    position = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if position is None:
        return
    command = getattr(root, "commands", {}).get(args[position])
    if command is None:
        return
    by_name = {}
    for param in command.params:
        for name in (*param.opts, *getattr(param, "secondary_opts", ())):
            by_name[name] = param
    seen: dict[str, tuple[str, bool | None]] = {}
    tokens = iter(args[position + 1 :])
    for token in tokens:
        if token == "--":
            break
        if not token.startswith("-"):
            continue
        name = token.split("=", 1)[0]
        param = by_name.get(name)
        if param is None:
            continue  # unknown: Typer names it
        if not getattr(param, "is_flag", False) and "=" not in token:
            next(tokens, None)  # the option's value
        if getattr(param, "multiple", False) or getattr(param, "count", False):
            continue
        canonical = ALIASES.get(param.opts[0], param.opts[0])
        flag = getattr(param, "is_flag", False)
        value = name not in getattr(param, "secondary_opts", ()) if flag else None
        if canonical in seen:
            first, before = seen[canonical]
            if flag and value == before:
                continue
            if flag:
                raise BadInputError(f"{first} and {name} contradict each other; give one")
            if first == name:
                raise BadInputError(f"{name} given twice; give it once")
            raise BadInputError(f"{first} and {name} name the same option; give it once")
        seen[canonical] = (name, value)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app and maps errors to one-line messages and exit codes."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        command = _command()
        _check_repeats(command, args)
        # Typer hands back an Exit's code, and turns a Ctrl-C that reaches it into Exit(130).
        code = command(args=args, prog_name="gradcli", standalone_mode=False)
    except typer.Exit as stop:
        code = stop.exit_code
    except USAGE_ERRORS as problem:
        return _usage_error(problem)
    except STOPS:
        code = EXIT_INTERRUPTED
    except GradcliError as problem:
        if debug:  # the traceback, then the same line and exit code as without --debug
            traceback.print_exc()
        prefix = "interrupted" if isinstance(problem, Interrupted) else "error"
        err.print(f"{prefix}: {problem}", highlight=False, soft_wrap=True, markup=False)
        return problem.exit_code
    except Exception as problem:  # an internal error: one line unless --debug
        if debug:
            raise
        err.print(
            f"internal error: {type(problem).__name__}: {problem} (rerun with --debug for details)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERNAL
    if code == EXIT_INTERRUPTED:
        err.print("interrupted; rerun the same command to resume from the last finished chunk")
    return code if isinstance(code, int) else 0


def _usage_error(problem: Exception) -> int:
    """A mistyped command line: one line naming the option and where its help is."""
    code = getattr(problem, "exit_code", 2) or 2
    message = problem.format_message() if hasattr(problem, "format_message") else str(problem)
    if not message:  # no arguments at all: Typer has printed the help already
        return code
    context = getattr(problem, "ctx", None)
    command = context.command_path if context is not None else "gradcli"
    err.print(
        f"error: {message.rstrip('.')}; see '{command} --help'",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
    return code
