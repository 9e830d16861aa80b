"""What a run store holds: stages, shapes, completion, configuration, spectrum, residuals.

Behind ``gradcli inspect``: a JSON-able description of the store, the PCA eigen-spectrum with
its explained-variance curve (the paper's Fig. 8) and, per embedded dataset, the relative
reconstruction error ``‖G − G V Vᵀ‖ / ‖G‖`` (the paper's Tables 2 and 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gradcli import layout
from gradcli.distributed import shard_range
from gradcli.errors import BadInputError, StaleStoreError
from gradcli.scores.residual import reconstruction_error

if TYPE_CHECKING:  # overview.py reads a Run through its public face; no import back up
    from gradcli.run import Run

STAGES = (layout.STATS, layout.SUBSPACE, layout.HEAD)
# Arrays up to this size are read whole to verify their chunks' checksums; larger ones (a
# big model's basis) only where inspect reads them anyway.
VERIFY_MAX_BYTES = 1 << 30


def preprocess_summary(run: Run) -> dict | None:
    """The store model's preprocessing: its fields and a one-line ``text``; None before a
    model is recorded."""
    from gradcli.config import Preprocess

    record = (run.store.attrs.get("model") or {}).get("preprocess")
    return Preprocess.from_dict(record).summary() if record else None


def embedding_summary(run: Run, name: str) -> dict:
    """What the store holds of embedding ``name``: ``rows`` and ``k`` (its reduced gradients'
    shape), whether it is ``complete``, and ``chunks_done`` of ``chunks`` row chunks."""
    rows, k = run.store.shape(layout.embedding(name, "grad"))
    done = run.store.read(layout.embedding(name, "done"))
    return {
        "rows": rows,
        "k": k,
        "complete": run.store.stage_complete(layout.embedding(name)),
        "chunks_done": int(done.sum()),
        "chunks": len(done),
    }


def damaged_arrays(run: Run) -> list[dict]:
    """Every array of the store (up to :data:`VERIFY_MAX_BYTES`) with chunks that fail their
    checksum: its path, the row ranges [start, stop) of those chunks, and what rewrites it."""
    return run.store.damaged_arrays(VERIFY_MAX_BYTES)


def shard_status(done: np.ndarray, count: int) -> dict:
    """Which of ``count`` shards have all their chunks done, and the chunks each other one
    still owes (keys are shard indices as strings, for JSON)."""
    complete, pending = [], {}
    for index in range(count):
        own = np.asarray(shard_range(len(done), index, count), dtype=np.int64)
        missing = own[~done[own]] if len(own) else own
        if len(missing):
            pending[str(index)] = missing.tolist()
        else:
            complete.append(index)
    return {"count": count, "complete": complete, "pending": pending}


def spectrum_of(run: Run) -> dict | None:
    """The subspace's method and K and, for PCA, its eigenvalues with the explained and
    cumulative variance shares; ``None`` before the subspace is complete."""
    store = run.store
    if not store.stage_complete(layout.SUBSPACE):
        return None
    sub = store.group_attrs(layout.SUBSPACE)
    spectrum = {"method": sub["provenance"]["method"], "k": sub.get("k")}
    if store.has(layout.EIGENVALUES) and not store.damaged_rows(layout.EIGENVALUES):
        values = store.read(layout.EIGENVALUES).astype(np.float64)
        total = float(sub.get("total_variance") or values.sum())
        spectrum.update(
            eigenvalues=values.tolist(),
            explained=(values / total).tolist(),
            cumulative=(np.cumsum(values) / total).tolist(),
            total_variance=total,
        )
    return spectrum


def describe(run: Run) -> dict:
    """Everything ``inspect`` reports, as plain data; arrays with damaged chunks are listed
    under ``damaged`` and left out of what is computed from them."""
    store = run.store
    store.require()
    attrs = store.attrs
    damaged = damaged_arrays(run)
    broken = {entry["array"] for entry in damaged}
    report: dict = {
        "store": store.url,
        "gradcli_version": attrs.get("gradcli_version"),
        "format_version": attrs.get("format_version"),
        "created": attrs.get("created"),
        "model": attrs.get("model"),
        "parameters": (attrs.get("params") or {}).get("size"),
        "id_train": attrs.get("id_train"),
        "id_test": attrs.get("id_test"),
        "stages": {},
        "embeddings": {},
        "damaged": damaged,
    }
    for stage in STAGES:
        if store.has(stage):
            stage_attrs = store.group_attrs(stage)
            report["stages"][stage] = {
                "complete": bool(stage_attrs.get("complete")),
                "provenance": stage_attrs.get("provenance"),
                "arrays": {
                    name: list(store.shape(f"{stage}/{name}"))
                    for name in store.children(stage)
                    if name != "state"
                },
            }
    if store.has(layout.SUBSPACE_STATE):
        state = store.group_attrs(layout.SUBSPACE_STATE)
        report["stages"][layout.SUBSPACE]["resume_point"] = {
            "iteration": state.get("iteration"),
            "batch": state.get("cursor"),
        }
    spectrum = spectrum_of(run)
    if spectrum is not None:
        report["spectrum"] = spectrum
    for name in run.embedding_names():
        path = layout.embedding(name)
        attrs_e = store.group_attrs(path)
        info = {
            "dataset": attrs_e.get("provenance", {}).get("dataset"),
            "fingerprint": attrs_e.get("provenance", {}).get("fingerprint"),
            "complete": bool(attrs_e.get("complete")),
        }
        if store.has(f"{path}/done") and f"{path}/done" not in broken:
            done = store.read(f"{path}/done")
            info["chunks_done"] = f"{int(done.sum())}/{len(done)}"
            count = int(store.group_attrs(f"{path}/done").get("shards", 1))
            if count > 1 and not info["complete"]:
                info["shards"] = shard_status(done, count)
        if store.has(f"{path}/grad"):
            info["shape"] = list(store.shape(f"{path}/grad"))
        if info["complete"]:
            try:
                arrays = run.load_embedding(name)
            except StaleStoreError as problem:  # damaged beyond what was verified above
                info["damaged"] = str(problem)
                report["embeddings"][name] = info
                continue
            error = reconstruction_error(arrays["grad"], arrays["gnorm"])
            info["reconstruction_error"] = {
                "mean": float(error.mean()) if len(error) else None,
                "std": float(error.std()) if len(error) else None,
            }
        report["embeddings"][name] = info
    return report


def plot_spectrum(report: dict, folder: str | Path) -> list[Path]:
    """Eigenvalue spectrum and explained-variance curve as PNGs; returns the files written."""
    spectrum = report.get("spectrum") or {}
    if "eigenvalues" not in spectrum:
        raise BadInputError("the store has no PCA spectrum to plot; extract with --method pca")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError("plots need matplotlib: pip install 'gradcli[plot]'") from None
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise BadInputError(f"--plot {target} is a file; name a folder for the plots")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create the plot folder {target}: {error.strerror}") from None
    values = np.asarray(spectrum["eigenvalues"])
    ranks = np.arange(1, len(values) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogy(ranks, values, marker=".")
    left.set(xlabel="component", ylabel="eigenvalue of GᵀG / N", title="gradient spectrum")
    right.plot(ranks, np.asarray(spectrum["cumulative"]) * 100, marker=".")
    right.set(xlabel="K", ylabel="explained variance (%)", title="explained variance")
    right.set_ylim(0, 100)
    figure.tight_layout()
    path = target / "spectrum.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
