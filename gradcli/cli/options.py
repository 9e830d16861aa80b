"""Every option shared by several commands, declared once: its flag, help and default.

Commands name these types (``store: Store = DEFAULT_STORE``) instead of repeating the
declaration. The detector options and the head's training options are not written out here at
all: :func:`detector_options` and :func:`head_options` add them to a command from their one
declaration (:data:`gradcli.scores.options.OPTIONS`, :class:`gradcli.head.HeadOptions`), so a
flag's default is the library's default. Those declarations live in modules that import torch,
so they are read when the command tree is built for a command that has them
(:func:`complete`), not when the CLI is imported: ``gradcli --help`` and ``gradcli version``
stay quick.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

STORE_ENV = "GRADCLI_STORE"
STORAGE_OPTIONS_ENV = "GRADCLI_STORAGE_OPTIONS"  # JSON object for the fsspec filesystem
DEFAULT_STORE = "artifacts/default"
DEFAULT_DEVICE = "cpu"
DEFAULT_BAD_IMAGE = "fail"
DEFAULT_BASIS_DTYPE = "float32"


class Tracebacks:
    """Whether this command line asked for tracebacks (``--debug``): set while it is parsed,
    read by :func:`gradcli.cli.app.main` when an error reaches it."""

    on = False

    @classmethod
    def remember(cls, value: bool) -> bool:
        cls.on = cls.on or bool(value)
        return value


Store = Annotated[
    str,
    typer.Option(
        "--store", envvar=STORE_ENV, help="Run store: a directory or fsspec URL (Zarr v3 group)."
    ),
]
Device = Annotated[str, typer.Option(help="Torch device: cpu, cuda or cuda:N.")]
DataRoot = Annotated[
    str | None,
    typer.Option(help="Folder holding the benchmark datasets (env GRADCLI_DATA_ROOT)."),
]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Debug = Annotated[
    bool,
    typer.Option(
        "--debug", help="Show tracebacks of errors.", callback=Tracebacks.remember, is_eager=True
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        help="DataLoader worker processes (default: some for image folders, 0 for arrays)."
    ),
]
Budget = Annotated[
    str | None,
    typer.Option(help="Memory budget, e.g. 8G (default: half the available RAM)."),
]
BadImage = Annotated[
    str, typer.Option(help="fail (default) or skip: what to do with an unreadable image.")
]
BasisDtype = Annotated[
    str, typer.Option(help="Basis precision in memory: float32 or bfloat16 (half the memory).")
]
Batch = Annotated[
    int | None, typer.Option(help="Images per gradient batch (default: from memory).")
]
METHOD_HELP = (
    "msp, energy, maxlogit, react, bats, maha, knn, vim, gradnorm, residual, gnorm, odin, "
    "ensemble or all (comma-separated or repeated; all = every method but odin, which needs "
    "the images)."
)
Method = Annotated[list[str] | None, typer.Option(metavar="NAMES", help=METHOD_HELP)]
Embedding = Annotated[
    list[str] | None,
    typer.Option(
        metavar="KINDS",
        help="grad, feat or both (both adds the ensemble; comma-separated or repeated) "
        "[default: both].",
    ),
]
Shard = Annotated[
    str | None,
    typer.Option(
        help="Compute only shard I of N (I/N, 0-based) of the rows; N processes started at "
        "once on one store fill it together."
    ),
]
ShardEnv = Annotated[
    str | None,
    typer.Option(
        help="Take I and N from the environment: 'slurm' (SLURM_ARRAY_TASK_ID, "
        "SLURM_ARRAY_TASK_COUNT) or two variable names ID_VAR,COUNT_VAR."
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Recompute this stage even if the store holds another version."
    ),
]

# The head's training options: the flag of each HeadOptions field the CLI sets, and its help.
# Their defaults are HeadOptions' own.
HEAD_FLAGS: dict[str, tuple[str, str]] = {
    "epochs": (
        "--epochs",
        "Head training epochs (default: enough for --min-steps, at least 10).",
    ),
    "min_steps": ("--min-steps", "Head: fewest SGD steps when --epochs is not given."),
    "lr": ("--lr", "SGD learning rate (decayed to 0 on a cosine)."),
    "batch_size": ("--head-batch-size", "Head training batch size."),
    "momentum": ("--momentum", "SGD momentum."),
    "weight_decay": ("--weight-decay", "SGD weight decay."),
    "seed": ("--seed", "Seed of the head's initialisation and shuffling."),
}


def head_parameter(field: str) -> str:
    """The command's parameter name of HeadOptions field ``field`` (e.g. head_batch_size)."""
    return HEAD_FLAGS[field][0].removeprefix("--").replace("-", "_")


def _parameter(
    name: str, annotation: Any, flags: Sequence[str], text: str, default: Any
) -> inspect.Parameter:
    """A keyword parameter of a command, declared as a Typer option."""
    option = typer.Option("/".join(flags), help=text)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[annotation, option],
        default=default,
    )


Parameters = Callable[[], list[inspect.Parameter]]


def extend(parameters: Parameters, before: str) -> Callable:
    """A decorator: the command gets the parameters ``parameters()`` builds (received in its
    ``**options``), listed in its help just before its parameter ``before``. They are built by
    :func:`complete`; until then the command shows its own parameters alone."""

    def add(command: Callable) -> Callable:
        if "_own_signature" not in command.__dict__:  # its own parameters, without **options
            own = inspect.signature(command, eval_str=True)
            command._own_signature = own.replace(  # type: ignore[attr-defined]
                parameters=[p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
            )
            command._added_options = []  # type: ignore[attr-defined]
            command.__signature__ = command._own_signature  # type: ignore[attr-defined]
        command._added_options.append((parameters, before))  # type: ignore[attr-defined]
        return command

    return add


def complete(command: Callable) -> None:
    """Give ``command`` the parameters :func:`extend` added to it, built from their
    declarations as they are now."""
    signature = command.__dict__.get("_own_signature")
    for parameters, before in command.__dict__.get("_added_options", []):
        own = list(signature.parameters.values())
        at = [p.name for p in own].index(before)
        listed = [*own[:at], *parameters(), *own[at:]]
        signature = signature.replace(
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in listed]
        )
    if signature is not None:
        command.__signature__ = signature  # type: ignore[attr-defined]


def detector_options(stage: str, before: str) -> Callable:
    """Add a flag per detector option of ``stage`` ("fit" or "score"): name, type, default
    and help from its declaration in :data:`gradcli.scores.options.OPTIONS`."""

    def parameters() -> list[inspect.Parameter]:
        from gradcli.scores.options import OPTIONS

        return [
            _parameter(o.name, o.annotation, o.flag.split("/"), o.help, o.default)
            for o in OPTIONS
            if o.stage == stage
        ]

    return extend(parameters, before)


def head_options(before: str) -> Callable:
    """Add the flags of :data:`HEAD_FLAGS`, typed and defaulted by HeadOptions' fields."""

    def parameters() -> list[inspect.Parameter]:
        from gradcli.head import HeadOptions

        fields = {f.name: f for f in dataclasses.fields(HeadOptions)}
        hints = typing.get_type_hints(HeadOptions)
        return [
            _parameter(head_parameter(name), hints[name], [flag], text, fields[name].default)
            for name, (flag, text) in HEAD_FLAGS.items()
        ]

    return extend(parameters, before)
