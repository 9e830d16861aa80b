"""PNG figures of an evaluation: ROC curves, score histograms, a reduced-gradient density and
sweep curves. matplotlib is optional (``pip install 'gradcli[plot]'``): :func:`pyplot` is
``None`` without it, and callers say how to get the plots instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

PLOT_HINT = "plots need matplotlib: pip install 'gradcli[plot]'"
EMBEDDING_TITLES = {"feat": "feature", "grad": "gradient", "ensemble": "ensemble"}


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def safe_name(name: str) -> str:
    """A file-name-safe form of a dataset or method name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def roc_figure(
    path: Path,
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, np.ndarray],
    ood_name: str,
    keys: Sequence[str],
) -> Path:
    """ROC curves (ID positive) against one OOD set: one panel per embedding, one line per
    method. ``keys`` are '<method>-<embedding>' names present in both score dicts."""
    plt = pyplot()
    kinds = [k for k in EMBEDDING_TITLES if any(key.endswith(f"-{k}") for key in keys)]
    figure, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for key in (key for key in keys if key.endswith(f"-{kind}")):
            id_values, ood_values = id_scores[key], ood_scores[key]
            labels = np.r_[np.ones(len(id_values)), np.zeros(len(ood_values))]
            fpr, tpr, _ = roc_curve(labels, np.r_[id_values, ood_values])
            ax.plot(fpr, tpr, label=key.rsplit("-", 1)[0], linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
        ax.axhline(0.95, color="grey", linewidth=0.6, linestyle="--")
        ax.set(
            xlabel="FPR (OOD accepted)",
            ylabel="TPR (ID accepted)",
            title=f"{EMBEDDING_TITLES[kind]} vs {ood_name}",
        )
        ax.legend(fontsize=7, loc="lower right")
    return _save(plt, figure, path)


def histogram_figure(
    path: Path,
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, Mapping[str, np.ndarray]],
    keys: Sequence[str],
) -> Path:
    """Score histograms, ID test vs each OOD set (rows), for each score in ``keys`` (columns)."""
    plt = pyplot()
    names = list(ood_scores)
    figure, axes = plt.subplots(
        len(names), len(keys), figsize=(4.2 * len(keys), 2.8 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            # Heavy tails would squash the rest into one bin: the outer 0.5% on each side go
            # into the edge bins.
            low, high = np.percentile(np.r_[id_scores[key], ood_scores[name][key]], [0.5, 99.5])
            bins = np.linspace(low, high, 41) if high > low else 40
            for values, label in ((id_scores[key], "ID test"), (ood_scores[name][key], name)):
                clipped = np.clip(values, low, high)
                ax.hist(clipped, bins=bins, density=True, alpha=0.55, label=label)
            ax.set(title=key, xlabel="score (higher = more ID)")
            ax.legend(fontsize=7)
    return _save(plt, figure, path)


def density_figure(
    path: Path, id_values: np.ndarray, ood_values: Mapping[str, np.ndarray], dim: int
) -> Path:
    """Density of one reduced-gradient dimension, ID test vs each OOD set."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    bins = np.histogram_bin_edges(np.concatenate([id_values, *ood_values.values()]), bins=50)
    ax.hist(id_values, bins=bins, density=True, histtype="step", linewidth=1.5, label="ID test")
    for name, values in ood_values.items():
        ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.2, label=name)
    ax.set(xlabel=f"reduced gradient, dimension {dim}", ylabel="density")
    ax.legend(fontsize=7)
    return _save(plt, figure, path)


def sweep_figure(path: Path, records: Sequence[Mapping[str, Any]], parameter: str) -> Path:
    """Average FPR95 and AUROC against the swept value, one line per method and embedding."""
    plt = pyplot()
    rows = [r for r in records if r["parameter"] == parameter and r["ood"] == "average"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    lines = dict.fromkeys((r["method"], r["embedding"]) for r in rows)
    for method, kind in lines:
        mine = sorted(
            (r for r in rows if (r["method"], r["embedding"]) == (method, kind)),
            key=lambda r: r["value"],
        )
        values = [r["value"] for r in mine]
        label = f"{method} {EMBEDDING_TITLES.get(kind, kind)}"
        left.plot(values, [100 * r["fpr95"] for r in mine], marker="o", label=label)
        right.plot(values, [100 * r["auroc"] for r in mine], marker="o", label=label)
    values = [r["value"] for r in rows]
    if values and min(values) > 0 and max(values) >= 20 * min(values):
        left.set_xscale("log")
        right.set_xscale("log")
    left.set(xlabel=parameter, ylabel="average FPR95 (%)", title=f"FPR95 vs {parameter}")
    right.set(xlabel=parameter, ylabel="average AUROC (%)", title=f"AUROC vs {parameter}")
    left.legend(fontsize=7)
    return _save(plt, figure, path)
