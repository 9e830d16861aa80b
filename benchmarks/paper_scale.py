"""The paper's scale in bounded memory: 1000 classes at 224 × 224, AG (K = 999), end to end.

Builds a synthetic ImageNet-style folder (1000 class folders, ``--per-class`` images each,
small JPEGs that the torchvision recipe resizes to 256 and crops to 224), a held-out ID test
folder and a synthetic OOD folder, then runs the README's pipeline with the command-line
tool, one process per stage, under ``--memory-budget``:

    extract-subspace (AG) -> embed (ID train) -> fit-head -> evaluate --ood <OOD folder>

on a torchvision ResNet with random weights and 1000 classes (``--params`` picks the
parameters whose gradients are used; the default keeps the basis a few GB on disk while
C · P · 8, the class sums an in-memory statistics pass would hold, is far over the budget).
For each stage it prints the wall time, time per image, the peak resident memory of the
stage's process (``ru_maxrss`` from ``wait4``), the budget, the data passes and plans the
stage reported, and the bytes it added to the store.

Run from the repository root (about 15 minutes on 2 cores with the defaults)::

    python benchmarks/paper_scale.py [--budget 1GiB] [--per-class 1] [--model resnet18]
        [--params 'layer4.1.conv2.*,fc.*'] [--device cpu] [--json scale.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradcli.budget import format_size, parse_size  # noqa: E402

from machine import describe, machine_info  # noqa: E402

CLASSES = 1000


def write_images(folder: Path, count: int, seed: int, size: int = 48) -> None:
    """``count`` seeded JPEGs of smooth random colour fields (size × size) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def make_data(root: Path, per_class: int, test_per_class: int, ood_images: int) -> dict:
    """ImageNet-style train/ and val/ class folders and an OOD folder under ``root``."""
    for c in range(CLASSES):
        write_images(root / "train" / f"n{c:08d}", per_class, seed=c)
    test_classes = range(0, CLASSES, max(1, CLASSES // 100))  # 100 classes hold test images
    for c in test_classes:
        write_images(root / "val" / f"n{c:08d}", test_per_class, seed=10_000 + c)
    for c in set(range(CLASSES)) - set(test_classes):
        (root / "val" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    write_images(root / "ood", ood_images, seed=99_999, size=64)
    return {
        "train": CLASSES * per_class,
        "test": len(test_classes) * test_per_class,
        "ood": ood_images,
    }


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def popen_peak(command: list[str], store: Path) -> dict:
    """One CLI stage in its own process: wall seconds, the process's peak RSS (from
    ``wait4``), its JSON summary, the notes it printed and the store bytes it added."""
    before = folder_bytes(store) if store.exists() else 0
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gradcli", *command, "--json"],
            cwd=ROOT,
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "GRADCLI_PROGRESS_INTERVAL": "3600"},
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"gradcli {command[0]} failed:\n{stderr[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss": usage.ru_maxrss * 1024,
        "summary": json.loads(stdout) if stdout.strip() else None,
        "notes": [line.strip() for line in stderr.splitlines() if line.strip()][-8:],
        "store_bytes_added": folder_bytes(store) - before,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--params", default="layer4.1.conv2.*,fc.*")
    parser.add_argument("--budget", default="1GiB")
    parser.add_argument("--per-class", type=int, default=1, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=1, help="of 100 test classes")
    parser.add_argument("--ood-images", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--basis-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--keep", type=Path, help="keep data and store in this folder")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="gradcli-paper-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    data, store = work / "data", work / "store"
    if store.exists():
        shutil.rmtree(store)
    counts = make_data(data, args.per_class, args.test_per_class, args.ood_images)
    budget = parse_size(args.budget)
    common = ["--store", str(store), "--memory-budget", args.budget, "--device", args.device]
    stages = {
        "extract-subspace (AG)": (
            [
                "extract-subspace",
                "--model",
                args.model,
                "--random-weights",
                "--params",
                args.params,
                "--dataset",
                f"folder:{data / 'train'}",
                *common,
            ],
            counts["train"],
        ),
        "embed (ID train)": (
            [
                "embed",
                "--dataset",
                f"folder:{data / 'train'}",
                "--basis-dtype",
                args.basis_dtype,
                *common,
            ],
            counts["train"],
        ),
        "fit-head": (
            ["fit-head", "--test", f"folder:{data / 'val'}", *common],
            counts["test"],
        ),
        "evaluate": (
            [
                "evaluate",
                "--id-test",
                f"folder:{data / 'val'}",
                "--ood",
                f"folder:{data / 'ood'}",
                "--method",
                "msp,energy,knn,maha",
                "--basis-dtype",
                args.basis_dtype,
                *common,
            ],
            counts["ood"],
        ),
    }
    figures: dict = {
        "machine": machine_info(args.device),
        "budget": budget,
        "images": counts,
        "stages": {},
    }
    print(describe(figures["machine"]), flush=True)
    for name, (command, images) in stages.items():
        print(f"running {name} ...", flush=True)
        figures["stages"][name] = result = popen_peak(command, store)
        result["images"] = images
        if name.startswith("extract"):
            summary = result["summary"] or {}
            figures["num_parameters"] = summary.get("num_parameters")
            figures["k"] = summary.get("k")
    p = figures.get("num_parameters") or 0
    print()
    print(
        f"{args.model}, 1000 classes, 224x224, --params {args.params}: P = {p:,}, "
        f"K = {figures.get('k')}; budget {format_size(budget)}; class sums C·P·8 = "
        f"{format_size(CLASSES * p * 8)} = {CLASSES * p * 8 / budget:.0f}x the budget"
    )
    print(
        f"{'stage':24} {'wall s':>8} {'s/image':>8} {'peak RSS':>10} {'/budget':>8} {'store +':>10}"
    )
    for name, result in figures["stages"].items():
        print(
            f"{name:24} {result['seconds']:10.1f} {result['seconds'] / result['images']:10.3f} "
            f"{format_size(result['peak_rss']):>10} {result['peak_rss'] / budget:10.2f} "
            f"{format_size(max(0, result['store_bytes_added'])):>10}"
        )
        for note in result["notes"]:
            print(f"    {note}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
