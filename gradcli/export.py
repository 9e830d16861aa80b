"""Per-input scores and OOD flags as a CSV or Parquet file, for shell pipelines.

One row per input: ``index`` (row in the embedding), ``item`` (file path, ``spec#index`` for
arrays, or ``<embedding>#<row>`` when the dataset is not at hand), then one column per score
and, where a threshold was calibrated, ``<score>_ood`` (1/true = flagged OOD).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from gradcli.errors import BadInputError

FORMATS = (".csv", ".parquet")
STDOUT = "-"  # --export - : the rows on standard output


def check_export_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it can be written (known suffix, existing folder, pyarrow for
    Parquet; ``-`` for standard output); else a one-line error naming the fix. Checked
    before any work is done."""
    if str(path) == STDOUT:
        return Path(STDOUT)
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in FORMATS:
        raise BadInputError(
            f"--export {path}: unknown file type '{suffix or '(none)'}'; name a .csv or "
            ".parquet file"
        )
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(
            f"--export {path}: folder {folder} does not exist; create it (mkdir -p {folder}) or "
            "export elsewhere"
        )
    if target.is_dir():
        raise BadInputError(f"--export {path} is a folder; name a file inside it")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise BadInputError(
                "--export to .parquet needs pyarrow: pip install pyarrow (or export to a .csv file)"
            ) from None
    return target


def _columns(
    items: Sequence[str],
    scores: Mapping[str, np.ndarray],
    flags: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Columns index, item, each score (N,) float64 and each flag (N,) bool as <score>_ood."""
    flags = flags or {}
    n = len(items)
    columns: dict[str, np.ndarray] = {
        "index": np.arange(n),
        "item": np.asarray(items, dtype=object),
    }
    for key, values in scores.items():
        if len(values) != n:
            raise BadInputError(f"{key} has {len(values)} scores for {n} inputs: rescore it")
        columns[key] = np.asarray(values, dtype=np.float64)
        if key in flags:
            columns[f"{key}_ood"] = np.asarray(flags[key], dtype=bool)
    return columns


def write_rows(
    handle: TextIO,
    items: Sequence[str],
    scores: Mapping[str, np.ndarray],
    flags: Mapping[str, np.ndarray] | None = None,
    *,
    json_lines: bool = False,
) -> None:
    """The export's rows on an open text stream: CSV (flags as 0/1), or one JSON object per
    line (flags as true/false) with ``json_lines``."""
    columns = _columns(items, scores, flags)
    if json_lines:
        names = list(columns)
        for row in zip(*(v.tolist() for v in columns.values()), strict=True):
            handle.write(json.dumps(dict(zip(names, row, strict=True))) + "\n")
    else:
        text = {k: v.astype(np.int8) if v.dtype == bool else v for k, v in columns.items()}
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(list(text))
        writer.writerows(zip(*(v.tolist() for v in text.values()), strict=True))
    handle.flush()


def export_scores(
    path: str | os.PathLike,
    items: Sequence[str],
    scores: Mapping[str, np.ndarray],
    flags: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write one row per input to ``path`` (.csv or .parquet): index, item, each score (N,)
    and each flag (N,) bool as ``<score>_ood``. The file is replaced atomically."""
    target = check_export_path(path)
    columns = _columns(items, scores, flags)
    partial = target.with_name(f".{target.name}.partial")
    try:
        if target.suffix.lower() == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({k: v.tolist() for k, v in columns.items()}), partial)
        else:
            with open(partial, "w", newline="", encoding="utf-8") as handle:
                write_rows(handle, items, scores, flags)
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise BadInputError(f"cannot write {target}: {error.strerror or error}") from None
    return target
