"""Every option shared by several commands, declared once: its flag, help and default.

Commands name these types (``store: Store = DEFAULT_STORE``) instead of repeating the
declaration. The detector options and the head's training options are not written out here at
all: :func:`detector_options` and :func:`head_options` add them to a command from their one
declaration (:data:`gradcli.scores.options.OPTIONS`, :class:`gradcli.head.HeadOptions`), so a
flag's default is the library's default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from gradcli.head import HeadOptions
from gradcli.scores.options import DetectorOption

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


def _adding(parameters: list[inspect.Parameter], before: str) -> Callable:
    """A decorator: the command gets ``parameters`` (received in its ``**options``), listed
    in its help just before its parameter ``before``."""

    def add(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in own].index(before)
        listed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*own[:at], *parameters]]
        listed += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[at:]]
        command.__signature__ = signature.replace(parameters=listed)  # type: ignore[attr-defined]
        return command

    return add


def detector_options(options: Sequence[DetectorOption], before: str) -> Callable:
    """Add a flag per detector option (name, type, default and help from its declaration)."""
    return _adding(
        [_parameter(o.name, o.annotation, o.flag.split("/"), o.help, o.default) for o in options],
        before,
    )


def head_options(before: str) -> Callable:
    """Add the flags of :data:`HEAD_FLAGS`, typed and defaulted by HeadOptions' fields."""
    fields = {f.name: f for f in dataclasses.fields(HeadOptions)}
    hints = typing.get_type_hints(HeadOptions)
    return _adding(
        [
            _parameter(head_parameter(name), hints[name], [flag], text, fields[name].default)
            for name, (flag, text) in HEAD_FLAGS.items()
        ],
        before,
    )
