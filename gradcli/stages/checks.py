"""Checks of options and names shared by the stages and the CLI: each refuses bad input with a
one-line error before any pass over the data starts.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields

import numpy as np
import torch

from gradcli import data as data_mod
from gradcli import layout
from gradcli.errors import BadInputError, GradcliError
from gradcli.stages import defaults
from gradcli.store import RESERVED_KEYS
from gradcli.subspace import (
    check_method,
)

BASIS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def unwrap_worker_errors(loader):
    """Batches of a multi-process loader; a worker's error keeps its one-line message.

    The DataLoader re-raises a worker's exception with the worker's traceback as its message;
    the original message is the last line of that text.
    """
    try:
        yield from loader
    except GradcliError as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        if len(lines) > 1:
            message = lines[-1].split(": ", 1)[-1]
            raise type(err)(message) from None
        raise


def check_finite(
    values: torch.Tensor, what: str, source: str, row_ids: np.ndarray | None = None
) -> None:
    """A NaN or Inf in a batch is an error naming the dataset rows, never written silently."""
    bad = ~torch.isfinite(values)
    if bad.any():
        rows = torch.nonzero(bad.reshape(values.shape[0], -1).any(dim=1)).flatten().cpu().numpy()
        named = np.asarray(row_ids)[rows] if row_ids is not None else rows
        where = "rows" if row_ids is not None else "batch rows"
        raise BadInputError(
            f"{what} of {source} contain NaN or Inf for {len(rows)} sample(s) ({where} "
            f"{named[:5].tolist()}); check those inputs and the model's weights"
        )


def _check_count(value, what: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadInputError(f"{what} must be a whole number, not {value!r}")
    if value < least:
        raise BadInputError(f"{what} must be at least {least}, not {value}")


def check_extract_options(
    *,
    method: str = "avg",
    k: int | None = None,
    oversample: int = defaults.PCA_OVERSAMPLE,
    iterations: int = defaults.PCA_ITERATIONS,
    checkpoint_every: int = defaults.CHECKPOINT_EVERY,
    iteration_dtype: str = "auto",
    batch_size: int | None = None,
    seed: int = defaults.SEED,
    max_samples: int | None = None,
) -> None:
    """Validate extract-subspace's options on their own, before a model is loaded or any data
    is read (the CLI calls it first; :meth:`Run.extract_subspace` too). What depends on the
    model or the data (K against the classes or the rank, the memory plan) is checked by
    ``Run.extract_subspace``, still before any pass over the data."""
    check_method(method, k, None)
    _check_count(oversample, "--oversample", 0)
    _check_count(iterations, "--iterations", 1)
    _check_count(checkpoint_every, "--checkpoint-every", 1)
    if iteration_dtype not in ("auto", *BASIS_DTYPES):
        raise BadInputError(
            f"--iteration-dtype must be auto, float32 or bfloat16, not '{iteration_dtype}'"
        )
    check_batch_size(batch_size)
    check_seed(seed)
    if max_samples is not None:
        _check_count(max_samples, "--max-samples", 1)


def check_batch_size(batch_size: int | None) -> int | None:
    """None (chosen from the memory budget) or a whole number ≥ 1, checked before anything is
    written (a stage records the batch it was made with)."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise BadInputError(f"--batch-size must be a whole number, not {batch_size!r}")
    if batch_size < 1:
        raise BadInputError(
            f"--batch-size must be at least 1, not {batch_size} (leave it out to choose it "
            "from the memory budget)"
        )
    return int(batch_size)


def check_seed(seed: int, what: str = "--seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise BadInputError(f"{what} must be a whole number from 0 to 2**32 - 1, not {seed!r}")
    return int(seed)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise BadInputError(f"--alpha must be a finite number, not {alpha!r}")
    return float(alpha)


def name_list(value: str | Sequence[str], what: str) -> list[str]:
    """Names from a sequence or from one comma-separated string ("knn,msp")."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    try:
        items = list(value)
    except TypeError:
        items = [value]
    if not all(isinstance(item, str) for item in items):
        raise BadInputError(f"{what} takes names (strings), not {items!r}")
    return items


def options(value, cls: type, what: str):
    """A ``cls`` options dataclass from itself, a dict of its fields, or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise BadInputError(
                f"{what}: unknown option(s) {', '.join(map(str, unknown))}; "
                f"{cls.__name__} has {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**value)
    raise BadInputError(f"{what} must be a {cls.__name__} or a dict of its fields")


def preferred(source: data_mod.ImageSource | None, names: list[str]) -> str | None:
    """Of the embeddings of one source: its default name when among them, else the only one."""
    if source is not None and source.slug in names:
        return source.slug
    return names[0] if len(names) == 1 else None


def check_embeddings(embeddings: list[str]) -> list[str]:
    unknown = [e for e in embeddings if e not in layout.SCORE_EMBEDDINGS]
    if unknown or not embeddings:
        raise BadInputError(
            f"unknown embedding(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(layout.SCORE_EMBEDDINGS)}"
        )
    return embeddings


def check_name(name: str) -> None:
    """An embedding name is one store key: ASCII letters, digits, '.', '-', '_', not hidden,
    not Zarr's own metadata file."""
    valid = re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) is not None
    if not valid or name == layout.EMBED or name in RESERVED_KEYS:
        raise BadInputError(
            f"--name '{name}' is not a valid name; use ASCII letters, digits, '.', '-' or '_'"
        )


def check_some_method_applies(classes: Mapping[str, type], embeddings: Sequence[str]) -> None:
    """At least one (method, embedding) pair asked for can be scored."""
    for cls in classes.values():
        kinds = set(cls.kinds)
        if kinds & set(embeddings) or (
            "ensemble" in embeddings and set(layout.EMBEDDINGS) <= kinds
        ):
            return
    scores = "; ".join(f"{m} scores {'/'.join(cls.kinds)}" for m, cls in classes.items())
    raise BadInputError(
        f"no --method asked for applies to --embedding {'/'.join(embeddings)} ({scores}); "
        "choose another --embedding or --method"
    )


def same_model(old: dict, new: dict) -> bool:
    """Recorded models are the same when they differ at most in the weights file's path while
    its sha256 is the same (a moved or copied file)."""
    if old == new:
        return True
    digest = old.get("weights_sha256")
    if not digest or digest != new.get("weights_sha256"):
        return False
    return {k: v for k, v in old.items() if k != "weights"} == {
        k: v for k, v in new.items() if k != "weights"
    }


def model_difference(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{key} {_brief(old.get(key))} -> {_brief(new.get(key))}" for key in keys[:3])


def _brief(value) -> str:
    """A value short enough for a one-line message; long ones (paths) keep their end."""
    text = str(value)
    return text if len(text) <= 40 else "…" + text[-39:]


def test_split_of(spec: str) -> str | None:
    """The ID test set that goes with a training spec, when the dataset has named splits."""
    if spec.startswith(("folder:", "npz:")):
        return None
    name = spec.split(":", 1)[0]
    return f"{name}:test"
