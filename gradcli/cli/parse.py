"""Option values the commands turn into library arguments: comma-separated lists, numbers,
input sizes, shards, method and embedding names, hidden old option names.

Separate from the commands so that each of them parses a value one way, with one message.
"""

from __future__ import annotations

import math

from gradcli.errors import BadInputError


def csv_items(values: str | None) -> list[str] | None:
    """The items of a comma-separated value; None when there are none."""
    if values is None:
        return None
    items = [v.strip() for v in values.split(",") if v.strip()]
    return items or None


def floats(values: str | None, option: str) -> list[float] | None:
    """Comma-separated numbers of ``option``; None when not given."""
    items = csv_items(values)
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise BadInputError(f"{option} takes comma-separated numbers, got '{values}'") from None


def input_size(value: str | None) -> int | tuple[int, int] | None:
    """``--input-size`` N or HxW."""
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


def shard(shard: str | None, shard_from_env: str | None) -> tuple[int, int] | None:
    """The shard (I, N) of ``--shard``, ``--shard-from-env`` or torchrun; None: all rows."""
    from gradcli.distributed import parse_shard, torchrun_shard
    from gradcli.distributed import shard_from_env as from_env

    if shard is not None and shard_from_env is not None:
        raise BadInputError("give --shard or --shard-from-env, not both")
    if shard is not None:
        return parse_shard(shard)
    if shard_from_env is not None:
        return from_env(None if shard_from_env.lower() == "slurm" else shard_from_env)
    return torchrun_shard()  # under torchrun: one shard per rank


def check_alpha(alpha: float) -> None:
    """Checked first: a calibration stored with another α would otherwise be named instead."""
    if not math.isfinite(alpha):
        raise BadInputError(f"--alpha must be a finite number, not {alpha}")


def one_of(value, alias, name: str, alias_name: str):
    """The value of an option or of its hidden old name, refusing both."""
    if value is not None and alias is not None:
        raise BadInputError(f"{name} and {alias_name} name the same option; give it once")
    return alias if value is None else value


def joined(values: list[str] | None) -> list[str]:
    """The items of a repeatable option, each occurrence also split at commas."""
    return [item for value in values or [] for item in csv_items(value) or []]


def methods(value: list[str] | None) -> list[str]:
    """Method names from --method; "all" is every embedding-based method (odin only by name)."""
    from gradcli.scores import METHODS, resolve_methods

    items = joined(value) or ["all"]
    unknown = [m for m in items if m not in (*METHODS, "ensemble", "all")]
    if unknown:
        raise BadInputError(
            f"unknown --method {', '.join(unknown)}; choose from {', '.join(METHODS)}, "
            "ensemble or all (see gradcli methods)"
        )
    return resolve_methods([m for m in items if m != "ensemble"])  # ensemble: an embedding


def embeddings(value: list[str] | None, methods_value: list[str] | None) -> list[str]:
    """Embedding kinds from --embedding (default both) and an 'ensemble' named in --method."""
    choices = {"grad": ["grad"], "feat": ["feat"], "both": ["grad", "feat", "ensemble"]}
    items = joined(value) or ["both"]
    wrong = [item for item in items if item not in choices]
    if wrong:
        raise BadInputError(f"--embedding must be grad, feat or both, not '{wrong[0]}'")
    kinds = list(dict.fromkeys(kind for item in items for kind in choices[item]))
    if "ensemble" in joined(methods_value):
        return ["ensemble"] if items == ["both"] else list(dict.fromkeys([*kinds, "ensemble"]))
    return kinds
