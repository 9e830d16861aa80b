"""The paper's Table-3-style comparison on data this machine has: every score, three embeddings.

Two benchmarks, each run end to end through gradcli (subspace, embeddings, head and
detectors, scores, metrics, report), with every method including the baselines (MSP, Energy,
MaxLogit, ReAct, BATS, Mahalanobis, KNN, ViM, GradNorm, ODIN) on forward features, reduced
gradients and their ensemble:

1. ``builtin`` — the offline demo benchmark: the demo CNN on mnist5k, against every built-in
   OOD set present (``gradcli demo``'s data).
2. ``cifar10`` — when ``../shared/data/cifar10-jpg.tar.xz`` (or ``--cifar PATH``) exists: a
   small residual CNN trained here on the 50,000 training JPEGs within a fixed CPU time budget
   (cached outside git, under ``--cache``, so it is trained once), ID test = the 10,000 test
   JPEGs, OOD = the built-in sets resized to 32×32 RGB. Statistics and the AG subspace come
   from a seeded 10,000-image training subset.

Prints each table and writes a Markdown/HTML report per benchmark under ``--out``. Then, on
the same stores, each gradient score (MSP, Energy, MaxLogit, ReAct, BATS on reduced gradients)
with gradcli's current defaults beside the earlier ones (head: 10 epochs at batch 512, lr 0.01,
no weight decay, constant lr; ReAct/BATS: every BN-output dimension rectified at its own
threshold), each fitted with ``--seeds`` head seeds: mean and spread of the average FPR95 and
AUROC over the OOD sets.

Run from the repository root::

    python benchmarks/paper_tables.py [--only builtin|cifar10] [--train-minutes 30]
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradcli.demo import ID_TEST, ID_TRAIN, WEIGHTS_FILE, present_ood_sets, train_demo_model
from gradcli.progress import NullProgress
from gradcli.report import write_report
from gradcli.run import Run
from gradcli.scores import METHODS

from machine import describe, machine_info

HERE = Path(__file__).resolve().parent
DEFAULT_CIFAR = HERE.parent.parent / "shared" / "data" / "cifar10-jpg.tar.xz"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# -- the CIFAR model ---------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Residual(c_out),
    )


class SmallResNet(nn.Module):
    """A ResNet-9-style CIFAR net (≈ 0.6 M parameters): fast enough to train on 2 CPU cores."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stages = nn.Sequential(
            _stage(width, 2 * width), _stage(2 * width, 4 * width), _stage(4 * width, 8 * width)
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def make_small_resnet(num_classes: int = 10) -> SmallResNet:
    """Factory for ``gradcli --model benchmarks/paper_tables.py:make_small_resnet``."""
    return SmallResNet(num_classes)


def extract_cifar(archive: Path, cache: Path) -> Path:
    """Unpack the JPEG archive once into ``cache`` and return the folder with train/ and test/."""
    target = cache / "cifar10-jpg"
    marker = target / ".complete"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        marker.touch()
    for root in (target, *[p for p in target.iterdir() if p.is_dir()]):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    raise SystemExit(f"{archive} holds no train/ and test/ folders")


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``folder:`` as uint8 (N, 3, 32, 32) and labels int64 (N,), decoded once
    (a one-off read of the JPEGs, kept in memory for the training epochs)."""
    from gradcli.data import resolve_dataset

    source = resolve_dataset(f"folder:{folder}")
    images = np.stack([np.asarray(source[i][0], dtype=np.uint8) for i in range(len(source))])
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=3)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return tensor, torch.from_numpy(source.labels().astype(np.int64))


def train_cifar(
    root: Path, path: Path, minutes: float, seed: int = 0, epochs: int | None = None
) -> dict:
    """Train SmallResNet on train/ for ``epochs`` epochs, or as many as a timing probe says fit
    in ``minutes`` of wall-clock time (SGD, one-cycle, crop + flip); save the state_dict and
    report the test accuracy."""
    torch.manual_seed(seed)
    x, y = load_split(root / "train")
    xt, yt = load_split(root / "test")
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    model = SmallResNet()
    batch = 256
    steps_per_epoch = len(y) // batch
    # Estimate the epochs that fit: time a few steps first.
    optimiser = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    probe = time.perf_counter()
    model.train()
    for _ in range(3):
        xb = (x[:batch].float() / 255 - mean) / std
        loss = F.cross_entropy(model(xb), y[:batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    per_step = (time.perf_counter() - probe) / 3
    if epochs is None:
        epochs = max(1, int(minutes * 60 * 0.9 / (per_step * steps_per_epoch)))
    model = SmallResNet()
    optimiser = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=0.2, total_steps=epochs * steps_per_epoch, pct_start=0.25
    )
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            xb = x[index].float() / 255
            padded = F.pad(xb, (4, 4, 4, 4), mode="reflect")
            dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
            xb = padded[:, :, dy : dy + 32, dx : dx + 32]
            if torch.rand(1, generator=generator).item() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model((xb - mean) / std), y[index], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        elapsed = time.perf_counter() - started
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {elapsed:.0f} s", flush=True)
    model.eval()
    with torch.inference_mode():
        correct = sum(
            int(
                (
                    model((xt[i : i + 1000].float() / 255 - mean) / std).argmax(1)
                    == yt[i : i + 1000]
                ).sum()
            )
            for i in range(0, len(yt), 1000)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    record = {
        "epochs": epochs,
        "train_seconds": time.perf_counter() - started,
        "test_accuracy": correct / len(yt),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record


# -- the comparison -----------------------------------------------------------------------------
def compare(run: Run, id_test: str, ood: list[str], out: Path) -> dict:
    """Every method on every embedding, the table printed and the report written."""
    started = time.perf_counter()
    results = run.evaluate(ood, id_dataset=id_test, methods=METHODS)
    written = write_report(run, results, out)
    seconds = time.perf_counter() - started
    rows = results.to_records()
    print((out / "report.md").read_text())
    return {"seconds": seconds, "report": [str(p) for p in written], "rows": rows}


# The head and rectification defaults before and after the paper's rule and the settled head.
EARLIER_DEFAULTS = {
    "head": {
        "epochs": 10,
        "lr": 0.01,
        "batch_size": 512,
        "weight_decay": 0.0,
        "min_steps": 1,
        "schedule": "constant",
    },
    "detectors": {"clip_rule": "per-dim"},
}
CURRENT_DEFAULTS: dict = {"head": {}, "detectors": {}}
GRADIENT_SCORES = ["msp", "energy", "maxlogit", "react", "bats"]


def gradient_defaults(run: Run, id_test: str, ood: list[str], seeds: int) -> dict:
    """Each gradient score's average FPR95/AUROC over ``ood`` under the earlier and the
    current defaults, one head fit per seed; prints mean ± sd (population) per score."""
    started = time.perf_counter()
    table: dict = {}
    for label, defaults in (("earlier", EARLIER_DEFAULTS), ("current", CURRENT_DEFAULTS)):
        for seed in range(seeds):
            head = {**defaults["head"], "seed": seed}
            run.fit_head(test=id_test, head=head, detectors=defaults["detectors"])
            results = run.evaluate(
                ood, id_dataset=id_test, methods=GRADIENT_SCORES, embeddings=["grad"]
            )
            for method in GRADIENT_SCORES:
                average = results.average((method, "grad"))
                cell = table.setdefault(method, {}).setdefault(label, {"fpr95": [], "auroc": []})
                cell["fpr95"].append(100 * average["fpr95"])
                cell["auroc"].append(100 * average["auroc"])
    run.fit_head(test=id_test)  # leave the store with the current defaults
    lines = [
        f"gradient scores, earlier vs current defaults ({seeds} head seeds; mean ± sd of the "
        "average over the OOD sets, %):",
        "",
        "| score | FPR95 earlier | FPR95 current | AUROC earlier | AUROC current |",
        "|---|--:|--:|--:|--:|",
    ]
    for method, cells in table.items():
        row = [method]
        for metric in ("fpr95", "auroc"):
            for label in ("earlier", "current"):
                values = np.asarray(cells[label][metric])
                row.append(f"{values.mean():.2f} ± {values.std():.2f}")
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines), flush=True)
    return {"seconds": time.perf_counter() - started, "seeds": seeds, "scores": table}


def builtin(out: Path, seeds: int) -> dict:
    store = out / "builtin-store"
    weights = store / WEIGHTS_FILE
    if not weights.exists():
        train_demo_model(weights, progress=NullProgress())
    run = Run(store)
    run.set_model("mnist_cnn", str(weights))
    run.extract_subspace(ID_TRAIN)
    run.fit_head(test=ID_TEST)
    record = compare(run, ID_TEST, present_ood_sets(), out / "builtin")
    record["gradient_defaults"] = gradient_defaults(run, ID_TEST, present_ood_sets(), seeds)
    return record


def cifar10(out: Path, archive: Path, cache: Path, minutes: float, seeds: int) -> dict:
    root = extract_cifar(archive, cache)
    weights = cache / "small_resnet_cifar10.pt"
    if weights.exists():
        training = json.loads(weights.with_suffix(".json").read_text())
    else:
        print(f"training SmallResNet on CIFAR-10 for at most {minutes:g} minutes", flush=True)
        training = train_cifar(root, weights, minutes)
    print(f"CIFAR-10 model: {training}", flush=True)
    store = out / "cifar10-store"
    run = Run(store)
    preprocess = {"input_size": 32, "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    run.set_model(f"{Path(__file__).resolve()}:make_small_resnet", str(weights), **preprocess)
    run.extract_subspace(f"folder:{root / 'train'}", max_samples=10_000)
    run.fit_head(test=f"folder:{root / 'test'}")  # head and detectors on the same 10k subset
    ood = [
        name
        for name in ("texture-patches", "fashion", "animals", "digits")
        if name in present_ood_sets()
    ]
    record = compare(run, f"folder:{root / 'test'}", ood, out / "cifar10")
    record["gradient_defaults"] = gradient_defaults(run, f"folder:{root / 'test'}", ood, seeds)
    record["training"] = training
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("builtin", "cifar10"))
    parser.add_argument("--out", default="artifacts/paper-tables", help="stores and reports")
    parser.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="cifar10-jpg.tar.xz")
    parser.add_argument(
        "--cache",
        default=os.path.expanduser("~/.cache/gradcli"),
        help="trained model and unpacked JPEGs",
    )
    parser.add_argument("--train-minutes", type=float, default=30.0)
    parser.add_argument("--seeds", type=int, default=5, help="head seeds per default set")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args()
    out = Path(args.out)
    record: dict = {
        "machine": describe(machine_info()),
    }
    if args.only in (None, "builtin"):
        record["builtin"] = builtin(out, args.seeds)
    if args.only in (None, "cifar10"):
        archive = Path(args.cifar)
        if archive.exists():
            record["cifar10"] = cifar10(
                out, archive, Path(args.cache), args.train_minutes, args.seeds
            )
        else:
            print(f"skipping CIFAR-10: {archive} is absent")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
