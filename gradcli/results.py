"""What an evaluation produced: metrics per (method, embedding) row and OOD set, and its
files (results.json, results.csv), merged across runs on the same ID set and settings."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradcli.errors import BadInputError
from gradcli.metrics import CONVENTIONS

if TYPE_CHECKING:
    from gradcli.store import RunStore

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")


@dataclass
class Results:
    """Metrics for every (method, embedding) row against every OOD set.

    ``rows[(method, embedding)][ood_name]`` is a dict with fpr95, auroc, aupr_in, aupr_out.
    """

    id_name: str
    ood_names: list[str]
    rows: dict[tuple[str, str], dict[str, dict[str, float]]] = field(default_factory=dict)
    convention: str = "paper"
    head_accuracy: float | None = None
    # "<method>-<embedding>" -> calibrated threshold λ and the realised acceptance at it
    calibration: dict[str, dict] = field(default_factory=dict)
    sweeps: list[dict] = field(default_factory=list)  # flat records, see gradcli.stages.sweep
    # what the scores were computed with (alpha, ODIN settings, stage digests): results files
    # merge only the results of equal settings
    settings: dict = field(default_factory=dict)
    id_scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    ood_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def average(self, key: tuple[str, str]) -> dict[str, float]:
        """Each metric of row ``key`` (method, embedding) averaged over the OOD sets."""
        per_set = self.rows[key]
        metrics = next(iter(per_set.values())).keys()
        return {m: float(np.mean([per_set[o][m] for o in self.ood_names])) for m in metrics}

    def to_records(self) -> list[dict]:
        """One flat record per (method, embedding, OOD set), plus the averages."""
        out = []
        for (method, emb), per_set in self.rows.items():
            for ood in [*self.ood_names, "average"]:
                values = per_set[ood] if ood != "average" else self.average((method, emb))
                out.append({"method": method, "embedding": emb, "ood": ood, **values})
        return out


def results_json(results: Results) -> str:
    """The full results as a JSON document (fractions, not percentages)."""
    document = {
        "id": results.id_name,
        "ood": results.ood_names,
        "convention": results.convention,
        "convention_text": CONVENTIONS[results.convention],
        "head_accuracy": results.head_accuracy,
        "results": results.to_records(),
    }
    if results.settings:
        document["settings"] = results.settings
    if results.calibration:
        document["calibration"] = results.calibration
    if results.sweeps:
        document["sweeps"] = results.sweeps
    return json.dumps(document, indent=2)


def results_csv(results: Results) -> str:
    """One row per (method, embedding, OOD set or 'average')."""
    return records_csv(results.to_records())


def records_csv(records: Sequence[dict]) -> str:
    """One CSV row per flat results record (see :meth:`Results.to_records`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", "embedding", "ood", *METRICS])
    writer.writeheader()
    for record in records:
        writer.writerow({k: record.get(k) for k in writer.fieldnames})
    return buffer.getvalue()


def _mergeable(old: dict, new: dict) -> bool:
    """Whether two results documents scored with the same ID set, convention and settings
    (alpha, ODIN, subspace, head and the detectors both evaluated), so that their rows can
    share one file."""
    if (old.get("id"), old.get("convention")) != (new.get("id"), new.get("convention")):
        return False
    old_settings, new_settings = old.get("settings") or {}, new.get("settings") or {}
    plain = [k for k in new_settings if k != "detectors"]
    if any(old_settings.get(k) != new_settings[k] for k in plain):
        return False
    old_detectors = old_settings.get("detectors") or {}
    new_detectors = new_settings.get("detectors") or {}
    return all(old_detectors[k] == new_detectors[k] for k in old_detectors.keys() & new_detectors)


def merge_results(old_text: str | None, new_text: str) -> str:
    """The results document ``new_text`` merged into ``old_text``: records keyed by (method,
    embedding, ood), the new ones replacing old ones, averages recomputed per (method,
    embedding) over its OOD sets. An unreadable old document, or one scored with another ID
    set, FPR convention or settings, is replaced; sweeps are the new run's alone."""
    new = json.loads(new_text)
    try:
        old = json.loads(old_text) if old_text else None
    except json.JSONDecodeError:
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("results"), list):
        return new_text
    if not _mergeable(old, new):
        return new_text

    def key(record: dict) -> tuple[str, str, str]:
        return record["method"], record["embedding"], record["ood"]

    rows = {key(r): r for r in old["results"] if r.get("ood") != "average"}
    rows.update({key(r): r for r in new["results"] if r["ood"] != "average"})
    oods = list(dict.fromkeys([*old.get("ood", []), *new["ood"], *(k[2] for k in rows)]))
    records = []
    for method, embedding in dict.fromkeys(k[:2] for k in rows):
        mine = [rows[(method, embedding, o)] for o in oods if (method, embedding, o) in rows]
        records += mine
        average = {m: float(np.mean([r[m] for r in mine])) for m in METRICS if m in mine[0]}
        records.append({"method": method, "embedding": embedding, "ood": "average", **average})
    merged = {k: v for k, v in old.items() if k != "sweeps"}
    merged.update({**new, "ood": oods, "results": records})
    settings = {**(old.get("settings") or {}), **(new.get("settings") or {})}
    if settings:
        detectors = {
            **(old.get("settings") or {}).get("detectors", {}),
            **(new.get("settings") or {}).get("detectors", {}),
        }
        merged["settings"] = {**settings, "detectors": detectors}
    calibration = {**old.get("calibration", {}), **new.get("calibration", {})}
    if calibration:
        merged["calibration"] = calibration
    return json.dumps(merged, indent=2)


def save_results(
    store: RunStore | str,
    results: Results,
    results_dir: str | Path | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """results.json and results.csv into ``results_dir`` or else the run store itself (a local
    folder or an object-store URL alike, given open or as its URL); returns the files written,
    [] on a read-only store without ``results_dir``.

    Results already there for the same ID set and FPR convention are merged with these by
    (method, embedding, OOD set), the newer replacing the older, so that a run on fewer OOD
    sets adds to the file instead of truncating it; averages are taken over the merged sets."""
    from gradcli.store import RunStore

    def as_csv(document: str) -> str:
        return records_csv(json.loads(document)["results"])

    url = store if isinstance(store, str) else store.url
    try:
        if results_dir is None:
            if isinstance(store, str):
                store = RunStore(store, create=False, storage_options=storage_options)
            if store.read_only:
                return []
            document = merge_results(store.read_text("results.json"), results_json(results))
            return [
                store.write_text("results.json", document),
                store.write_text("results.csv", as_csv(document)),
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
        where = results_dir if results_dir is not None else url
        fix = "pass another --results-dir" if results_dir is not None else "pass --results-dir"
        raise BadInputError(f"cannot write results to {where}: {error}; {fix}") from None
