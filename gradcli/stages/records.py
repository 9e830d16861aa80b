"""What stored scores and thresholds record: the settings a score was computed with (its
source) and the calibrated thresholds, refused when those settings have changed since.

Scoring checks stored thresholds and calibration writes them, so both read them from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradcli import layout
from gradcli.errors import StaleStoreError
from gradcli.scores import INPUT_DETECTORS
from gradcli.scores.baselines import ODIN
from gradcli.stages.context import RunContext


def source(run: RunContext, key: str, alpha: float, odin: ODIN) -> dict:
    """What scores ``key`` ('<method>-<embedding>') are computed with, apart from the data:
    the fitted detector's digest; ODIN's options and the model's weights; for an ensemble
    both parts and α. Recorded with stored scores and calibrated thresholds."""
    method, kind = key.rsplit("-", 1)
    if kind == "ensemble":
        return {
            "feat": source(run, f"{method}-feat", alpha, odin),
            "grad": source(run, f"{method}-grad", alpha, odin),
            "alpha": float(alpha),
        }
    if method in INPUT_DETECTORS:
        weights = (run.store.attrs.get("model") or {}).get("weights_sha256")
        return {"model": weights, method: odin.config()}
    return {"detector": run.store.stage_digest(layout.detector(kind, method))}


def calibration(run: RunContext, key: str) -> dict | None:
    """The stored calibration of scores ``key``: threshold λ, tpr, dataset, source."""
    path = layout.calibration(key)
    return run.store.group_attrs(path) if run.store.has(path) else None


def calibrations(run: RunContext, keys: Sequence[str], alpha: float, odin: ODIN) -> dict[str, dict]:
    """Stored calibrations of ``keys``; one made with other settings is an error."""
    found = {}
    for key in keys:
        record = calibration(run, key)
        if record is None:
            continue
        settings = source(run, key, alpha, odin)
        if record.get("source") != settings:
            changed = sorted(
                k
                for k in set(settings) | set(record.get("source") or {})
                if settings.get(k) != (record.get("source") or {}).get(k)
            )
            if "detector" in changed or set(changed) <= {"feat", "grad"}:
                raise StaleStoreError(
                    f"the {key} detector was refit (fit-head) after its threshold was "
                    f"calibrated on '{record.get('dataset')}'; recalibrate with score "
                    f"--calibrate-on {record.get('dataset')}"
                )
            raise StaleStoreError(
                f"the threshold of {key} was calibrated on '{record.get('dataset')}' with "
                f"other settings ({', '.join(changed)} differ); rerun score with "
                "--calibrate-on SPEC to recalibrate, or score with the calibrated settings"
            )
        found[key] = record
    return found
