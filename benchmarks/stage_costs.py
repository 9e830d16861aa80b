"""Per-image cost of each stage's work at the paper's scale, for the README's cost model.

On a torchvision ResNet (random weights, 1000 classes, eval mode) at 224 × 224 it times, per
image, side by side in one process on one device:

(a) floor      — a plain batched forward and backward of ``Σ E`` (no per-sample work);
(b) engine     — gradcli's per-sample gradient engine: capture and every tile, nothing more;
(c) statistics — the engine feeding the statistics pass (float64 mean and M2 on the CPU);
(d) projection — the product ``tile · V`` over all P rows for K columns, in the basis
                 dtype: timed on ``--probe-rows`` rows of a random basis and scaled to P
                 (its cost is linear in P; a P × K basis is 51 GB in bf16 at K = 1000).

From these: embed ≈ (b) + (d) at K; one PCA iteration ≈ (b) + 2 × (d) at K + p (``U = G V``
then ``Y += Gᵀ U``); the Rayleigh–Ritz pass ≈ (b) + (d) at K + p; the AG statistics pass ≈ (c).
Each figure is the best of ``--repeats`` interleaved rounds after a warm-up.

Run from the repository root::

    python benchmarks/stage_costs.py [--device cpu|cuda] [--model resnet50] [--images 16]
        [--batch-size 8] [--k 1000] [--dtype bfloat16] [--json costs.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradcli.grads import (  # noqa: E402
    GradientStatistics,
    LayerGradients,
    energy,
    select_parameters,  # noqa: E402
)
from gradcli.models import load_model  # noqa: E402

from machine import describe, machine_info  # noqa: E402


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(device: torch.device, work, repeats: int) -> float:
    """Best wall time of ``work()`` over ``repeats`` runs (after one warm-up run)."""
    work()
    times = []
    for _ in range(repeats):
        synchronise(device)
        began = time.perf_counter()
        work()
        synchronise(device)
        times.append(time.perf_counter() - began)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--probe-rows", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    loaded = load_model(args.model, random_weights=True, device=device)
    model = loaded.module
    selection = select_parameters(model)
    params = [p for _, p in model.named_parameters()]
    p = selection.size
    images = torch.randn(args.images, 3, 224, 224, device=device)
    batch = args.batch_size
    engine = LayerGradients(model, selection)

    def floor() -> None:
        for i in range(0, args.images, batch):
            with torch.enable_grad():
                total = energy(model(images[i : i + batch])).sum()
                torch.autograd.grad(total, params)

    def engine_only() -> None:
        for i in range(0, args.images, batch):
            engine.capture(images[i : i + batch])
            for _ in engine.tiles():
                pass

    def statistics() -> None:
        stats = GradientStatistics(p)
        for i in range(0, args.images, batch):
            x = images[i : i + batch]
            engine.capture(x)
            for start, tile in engine.tiles():
                stats.update_rows(start, tile)
            stats.commit(x.shape[0])

    dtype = getattr(torch, args.dtype)
    rows = min(args.probe_rows, p)
    generator = torch.Generator(device=device).manual_seed(0)

    def projection_seconds(width: int) -> float:
        basis = torch.randn(rows, width, device=device, generator=generator).to(dtype)
        tile = torch.randn(batch, rows, device=device, generator=generator).to(dtype)
        seconds = best_seconds(device, lambda: tile @ basis, args.repeats)
        return seconds * (p / rows) / batch

    per_image = {
        "floor": best_seconds(device, floor, args.repeats) / args.images,
        "engine": best_seconds(device, engine_only, args.repeats) / args.images,
        "statistics": best_seconds(device, statistics, args.repeats) / args.images,
        "projection_k": projection_seconds(args.k),
        "projection_k_plus_p": projection_seconds(args.k + args.oversample),
    }
    per_image["embed"] = per_image["engine"] + per_image["projection_k"]
    per_image["pca_iteration"] = per_image["engine"] + 2 * per_image["projection_k_plus_p"]
    per_image["rayleigh_ritz"] = per_image["engine"] + per_image["projection_k_plus_p"]
    info = machine_info(device)
    figures = {
        "machine": info,
        "model": args.model,
        "num_parameters": p,
        "k": args.k,
        "dtype": args.dtype,
        "batch_size": batch,
        "seconds_per_image": per_image,
    }
    print(describe(info))
    print(f"{args.model} at 224x224, P = {p:,}, K = {args.k}, basis {args.dtype}, batch {batch}")
    for name, seconds in per_image.items():
        print(f"  {name:22} {seconds * 1e3:10.2f} ms/image")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
