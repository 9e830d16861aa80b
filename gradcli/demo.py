"""The built-in offline benchmark behind ``gradcli demo``.

A small CNN is trained on the 4,000 mnist5k training digits (seeded, cached in the run
store's folder), then the whole pipeline runs: AG subspace, embeddings, head and detectors, scores,
and metrics against every built-in OOD set whose files are present.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gradcli.data import BUILTIN_SETS, list_datasets, make_loader, resolve_dataset
from gradcli.models import load_model
from gradcli.progress import NullProgress, Progress
from gradcli.results import Results
from gradcli.run import Run

ID_TRAIN = "mnist5k:train"
ID_TEST = "mnist5k:test"
OOD_CANDIDATES = ("fashion", "animals", "texture-patches", "digits")
WEIGHTS_FILE = "mnist_cnn.pt"


def train_demo_model(
    path: Path, *, epochs: int = 4, seed: int = 0, progress: Progress | None = None
) -> Path:
    """Train the built-in ``mnist_cnn`` on mnist5k:train and save its state_dict to ``path``."""
    progress = progress or NullProgress()
    torch.manual_seed(seed)
    model = load_model("mnist_cnn")
    module = model.module.train()
    source = resolve_dataset(ID_TRAIN)
    loader = make_loader(source, model.preprocess, batch_size=len(source))
    x, y = next(iter(loader))
    optimiser = torch.optim.Adam(module.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (len(y) // 64)
    with progress.task("train demo CNN", total=steps) as advance:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y) - 63, 64):
                batch = order[start : start + 64]
                optimiser.zero_grad()
                loss = nn.functional.cross_entropy(module(x[batch]), y[batch])
                loss.backward()
                optimiser.step()
                advance(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(module.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def present_ood_sets() -> list[str]:
    """Built-in OOD sets whose files are installed on this machine."""
    found = {row["name"] for row in list_datasets(None) if row["found"]}
    return [name for name in OOD_CANDIDATES if name in found]


def skipped_ood_sets() -> dict[str, str]:
    """The demo's OOD sets that are not installed here, each with why and how to add it."""
    found = {row["name"] for row in list_datasets(None) if row["found"]}
    return {
        name: f"not installed ({BUILTIN_SETS[name].install_hint})"
        for name in OOD_CANDIDATES
        if name not in found
    }


def run_demo(
    store: str | os.PathLike = "artifacts/demo", *, progress: Progress | None = None
) -> Results:
    """Train (once), extract, embed, fit, score and evaluate against every built-in OOD set
    that is installed (:func:`skipped_ood_sets` names the others); returns the results."""
    progress = progress or NullProgress()
    folder = Path(store)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        train_demo_model(weights, progress=progress)
    run = Run(folder, progress=progress)
    run.set_model("mnist_cnn", str(weights))
    run.extract_subspace(ID_TRAIN)
    summary = run.fit_head(test=ID_TEST)
    results = run.evaluate(present_ood_sets(), id_dataset=ID_TEST)
    progress.note(
        f"demo CNN test accuracy {100 * summary['model_test_accuracy']:.2f}%, "
        f"gradient head {100 * summary['test_accuracy']:.2f}%"
    )
    return results


__all__ = ["run_demo", "train_demo_model", "present_ood_sets", "skipped_ood_sets"]
