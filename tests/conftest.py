"""Shared fixtures: a tiny model file and tiny npz datasets, so pipeline tests run in seconds."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcli.cli import main

MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3),
        )
    """
)
PREPROCESS = ["--input-size", "8", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


def _blobs(rng: np.random.Generator, n: int, ood: bool = False) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 3
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.float64)
    if ood:
        x = rng.uniform(0, 255, size=(n, 8, 8, 3))
    else:
        x = colours[labels][:, None, None, :] + rng.normal(0, 25, size=(n, 8, 8, 3))
    return np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64)


@dataclass
class Tiny:
    """Paths of the tiny model, its weights and datasets."""

    root: Path
    model: str
    weights: Path
    other_weights: Path
    train: str
    test: str
    ood: str

    def extract_args(self, store: Path, weights: Path | None = None) -> list[str]:
        return [
            "extract-subspace",
            "--model",
            self.model,
            "--weights",
            str(weights or self.weights),
            "--dataset",
            self.train,
            "--store",
            str(store),
            "--quiet",
            *PREPROCESS,
        ]


def _train_tiny(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    inputs = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    targets = torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(30):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimiser.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    (root / "tinynet.py").write_text(MODEL_SOURCE)
    rng = np.random.default_rng(0)
    x_train, y_train = _blobs(rng, 90)
    x_test, y_test = _blobs(rng, 45)
    x_ood, _ = _blobs(rng, 30, ood=True)
    np.savez(root / "train.npz", x=x_train, y=y_train)
    np.savez(root / "test.npz", x=x_test, y=y_test)
    np.savez(root / "ood.npz", x=x_ood)
    namespace: dict = {}
    exec(MODEL_SOURCE, namespace)
    for seed, name in ((0, "weights.pt"), (1, "other.pt")):
        torch.manual_seed(seed)
        net = namespace["make"]()
        _train_tiny(net, x_train, y_train)
        torch.save(net.state_dict(), root / name)
    return Tiny(
        root=root,
        model=f"{root / 'tinynet.py'}:make",
        weights=root / "weights.pt",
        other_weights=root / "other.pt",
        train=f"npz:{root / 'train.npz'}",
        test=f"npz:{root / 'test.npz'}",
        ood=f"npz:{root / 'ood.npz'}",
    )


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run the gradcli entry point in-process; returns exit code, stdout and stderr."""

    def invoke(*args: str) -> Outcome:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return invoke


def count_committed_batches(monkeypatch) -> list[int]:
    """Patch GradientStatistics.commit to record each committed batch's size; returns the
    list it appends to."""
    from gradcli.grads import GradientStatistics

    seen: list[int] = []
    commit = GradientStatistics.commit

    def counting(self, size):
        seen.append(int(size))
        return commit(self, size)

    monkeypatch.setattr(GradientStatistics, "commit", counting)
    return seen
