"""Speed of reduced-gradient embedding: gradcli's engine against a one-image loop and a floor.

On CIFAR ResNet-18 (random weights, eval mode, seeded) and random 32×32 images, for each K it
times, side by side in one process:

(a) loop   — per image: forward, backward of E, ``torch.cat`` of ``p.grad``, centre/scale,
             matvec with the basis (timed on a small subset, reported per image);
(b) floor  — a plain batched forward and backward of ``Σ E`` with no per-sample work;
(c) engine — :class:`gradcli.grads.LayerGradients` (capture + tiles) feeding
             :class:`gradcli.grads.Projector`, with the basis held in float32 and in bfloat16.

"Useful" work per image is ``3 × forward FLOPs + 2·P·K`` (forward, the two halves of the
backward, and the projection), reported against a float32 matmul peak measured in the same
run (before the methods and after each K; the best counts). On the loop's images the
engine's reduced gradients are checked against the loop's and against an exact float64
projection of the same gradients. Each method is warmed up, then
timed ``--repeats`` times (default 3) in interleaved rounds (floor, loop, engine fp32, engine
bf16, the order rotated each round, so drift of a shared machine weighs on all alike); the best
run of each counts, and the printout lists every run.

Each K also times the projection product alone (the engine's own GEMM on a tile already
centred, and already bfloat16 for the bf16 basis) and prints a lower bound on the engine:
floor + projection alone. The engine must do all the floor's work (its per-sample weight
gradients are the same FLOPs as the floor's summed ones, in smaller products) and the
projection on top; the bound takes its centring, norms and casts as free. A goal the bound
already misses is out of reach on the machine with this BLAS, not only not met.

The normalisation is random but on the gradients' own scale, and the basis is the Q factor of a
seeded Gaussian, kept in row blocks (K=200: 8.9 GB in float32 plus its 4.5 GB bfloat16 copy,
both held for the interleaved rounds); the loop multiplies block by block, which costs the same
as one matvec.

Run from the repository root::

    python benchmarks/embed_speed.py [--device cpu|cuda] [--images 128] [--ks 10,50,200]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradcli.grads import LayerGradients, Projector, energy, select_parameters
from gradcli.models import load_model

from machine import describe, machine_info

BLOCK_BYTES = 256 << 20  # float32 basis rows per block: bounds every transient copy of a block
# Relative max errors (max |Δz| / max |z|) allowed. z sums ~10⁷ terms with heavy cancellation
# (‖G‖/|z| ≈ 10³): a float32 matvec over a whole block (the loop) loses ~1e-4, while the engine
# sums its tiles in float64. A batch's convolutions round differently from one image's, so an
# activation within rounding of a ReLU's kink can switch sides and move one image's gradient by
# ~1e-3: the batched engine is held to the loop only loosely, and to the exact value through the
# same images taken one at a time.
EXACT_TOLERANCE = 1e-4  # engine, one image at a time, against float64 normalisation/projection
SINGLE_TOLERANCE = 1e-3  # engine, one image at a time, against the loop
BATCHED_TOLERANCE = 1e-2  # engine, batched (the timed run), against the loop
BF16_TOLERANCE = 3e-2  # engine with a bfloat16 basis against float32
PROBE_COLUMNS = 131072  # basis rows in the projection-alone probe (the engine's tile width)
T = TypeVar("T")
GOALS = {
    "speedup_k50": 6.0,
    "speedup_k200": 10.0,
    "fp32_peak_fraction_fp32_basis": 0.6,
    "fp32_peak_fraction_bf16_basis": 0.8,
}


@dataclass
class Result:
    """One method's timing at one K."""

    k: int
    method: str
    images: int
    seconds: float  # the best of the repeated runs
    useful_flops_per_image: float
    peak_memory_bytes: int
    cpu_share: float  # process CPU time / (wall time × torch threads): low when others compete
    runs: tuple[float, ...] = ()  # every repeat's seconds, in order

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def ms_per_image(self) -> float:
        return 1e3 * self.seconds / self.images

    @property
    def useful_gflops(self) -> float:
        return self.useful_flops_per_image * self.images_per_s / 1e9


# -- machine and reference rates -------------------------------------------------------------


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run: Callable[..., T], *args, **kwargs) -> tuple[float, float, T]:
    """Run ``run(*args, **kwargs)`` with the device idle at both ends: (wall seconds, CPU
    share, value), the share being this process's CPU time over wall time × torch threads."""
    synchronise(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    value = run(*args, **kwargs)
    synchronise(device)
    seconds = time.perf_counter() - start
    cpu_share = (time.process_time() - cpu_start) / (seconds * torch.get_num_threads())
    return seconds, cpu_share, value


@dataclass
class Timing:
    """One method's repeated runs: the best, its CPU share, every run, and the peak memory."""

    best: float
    cpu_share: float
    runs: tuple[float, ...]
    peak_memory: int
    value: object


def timed_rounds(
    device: torch.device, repeats: int, methods: dict[str, tuple[Callable, tuple]]
) -> dict[str, Timing]:
    """Every method timed ``repeats`` times in interleaved rounds, the order rotated each round,
    so that a machine that slows down or speeds up over minutes weighs on every method alike.
    The best run counts (the one least disturbed by other work); peak memory is the highest
    over a method's runs."""
    names = list(methods)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    peaks = dict.fromkeys(names, 0)
    values: dict[str, object] = {}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            run, args = methods[name]
            reset_peak_memory(device)
            seconds, share, values[name] = timed(device, run, *args)
            runs[name].append((seconds, share))
            peaks[name] = max(peaks[name], peak_memory(device))
    timings = {}
    for name in names:
        best, share = min(runs[name])
        timings[name] = Timing(
            best, share, tuple(seconds for seconds, _ in runs[name]), peaks[name], values[name]
        )
    return timings


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the device's allocation peak on cuda; on Linux the process's peak
    resident set (VmHWM) is set back to its current size."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak (ru_maxrss)


def peak_memory(device: torch.device) -> int:
    """Bytes: the device's peak allocation since the last reset on cuda, else the process's
    peak resident set size since the last reset (Linux) or ever."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, reps: int = 8) -> float:
    """Best FLOP/s of a square ``torch.mm`` (size³ multiply-adds) in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = min(timed(device, torch.mm, a, b, out=out)[0] for _ in range(reps))
    return 2.0 * size**3 / best


def forward_flops(model: nn.Module, image: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of one image (1, C, H, W)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(image)
    return int(counter.get_total_flops())


# -- normalisation and basis -----------------------------------------------------------------


def calibrated_normalisation(
    model: nn.Module, params: list[nn.Parameter], images: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random gradient mean (P,) and positive scale (P,), float32 on the CPU, on the scale of
    the model's own gradients.

    Per parameter tensor, with ``ḡ`` the batch-mean gradient of ``images`` and ``m`` its RMS:
    mean = ``ḡ + 0.1·m·N(0, 1)``, scale = ``m·U(0.5, 2)``. Centred and scaled gradients then
    differ from image to image by O(1), so comparing reduced gradients tests the gradients
    themselves rather than a constant offset.
    """
    with torch.enable_grad():
        total = energy(model(images)).sum()
        grads = torch.autograd.grad(total, params)
    flat = [g.detach().reshape(-1).cpu().double() / images.shape[0] for g in grads]
    overall = torch.cat(flat).square().mean().sqrt().clamp_min(1e-30)
    gen = torch.Generator().manual_seed(seed)
    means, scales = [], []
    for g in flat:
        rms = g.square().mean().sqrt().clamp_min(1e-3 * overall)
        means.append(g + 0.1 * rms * torch.randn(g.shape, generator=gen, dtype=torch.float64))
        scales.append(rms * torch.empty_like(g).uniform_(0.5, 2.0, generator=gen))
    return torch.cat(means).float(), torch.cat(scales).float()


def orthonormal_basis_blocks(size: int, k: int, seed: int) -> list[tuple[int, torch.Tensor]]:
    """The Q factor of a seeded Gaussian (P, K), as row blocks held transposed, the layout
    gradcli's projection reads a basis in: [(first_row, (K, rows) float32)].

    Blockwise Cholesky QR: ``A = QR`` with ``RᵀR = AᵀA`` (accumulated in float64), then
    ``Q = A R⁻¹`` block by block, replacing each block, so no second P×K copy is ever held.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, BLOCK_BYTES // (4 * k))
    blocks, gram = [], torch.zeros(k, k, dtype=torch.float64)
    for start in range(0, size, rows):
        block = torch.randn(min(rows, size - start), k, generator=gen)
        gram += (block.T @ block).double()
        blocks.append((start, block))
    upper = torch.linalg.cholesky(gram).mT
    inverse = torch.linalg.inv(upper).float()
    for i, (start, block) in enumerate(blocks):
        blocks[i] = (start, (block @ inverse).T.contiguous())
        del block
    return blocks


class BlockedProjection:
    """Projectors over consecutive row blocks, fed engine tiles that may straddle blocks."""

    def __init__(self, projectors: list[Projector], ranges: list[tuple[int, int]]) -> None:
        self.projectors = projectors
        self.ranges = ranges
        self.starts = [first for first, _ in ranges]

    def add(self, start: int, tile: torch.Tensor, z: torch.Tensor, gnorm2: torch.Tensor) -> None:
        """Add rows [start, start + r) of a batch: tile (B, r), overwritten; z (B, K), gnorm2
        (B,) float64."""
        stop = start + tile.shape[1]
        index = bisect.bisect_right(self.starts, start) - 1
        while index < len(self.projectors) and self.starts[index] < stop:
            block_start, block_stop = self.ranges[index]
            first, last = max(start, block_start), min(stop, block_stop)
            whole = (first, last) == (start, stop)
            piece = tile if whole else tile[:, first - start : last - start]
            self.projectors[index].add(first, piece, z, gnorm2, in_place=True)
            index += 1


def blocked_projection(
    blocks: list[tuple[int, torch.Tensor]],
    mean: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> BlockedProjection:
    """One :class:`Projector` per basis block, holding the basis in ``dtype`` on ``device``
    (a float32 block already on ``device`` is used as it is, without a copy)."""
    projectors, ranges = [], []
    for start, block in blocks:
        rows = slice(start, start + block.shape[1])
        projectors.append(
            Projector(
                mean[rows],
                scale[rows],
                block,
                start=start,
                dtype=dtype,
                device=device,
                transposed=True,
            )
        )
        ranges.append((rows.start, rows.stop))
    return BlockedProjection(projectors, ranges)


# -- the three methods -----------------------------------------------------------------------


def loop_embed(
    model: nn.Module,
    params: list[nn.Parameter],
    images: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    blocks: list[tuple[int, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image at a time: (n, K) float64 reduced gradients and (n,) ``‖G‖²``."""
    k = blocks[0][1].shape[0]
    z = torch.zeros(images.shape[0], k, dtype=torch.float64, device=images.device)
    gnorm2 = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    for i in range(images.shape[0]):
        model.zero_grad(set_to_none=True)
        energy(model(images[i : i + 1])).sum().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        normalised = (grad - mean) / scale
        gnorm2[i] = normalised.square().sum(dtype=torch.float64)
        for start, block in blocks:
            z[i] += (normalised[start : start + block.shape[1]] @ block.T).double()
    model.zero_grad(set_to_none=True)
    return z, gnorm2


def single_image_gradients(
    model: nn.Module, params: list[nn.Parameter], images: torch.Tensor
) -> torch.Tensor:
    """Each image's flattened gradient from its own forward/backward: (n, P) float32 on the
    CPU, as the loop computes them."""
    grads = []
    for i in range(images.shape[0]):
        model.zero_grad(set_to_none=True)
        energy(model(images[i : i + 1])).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).cpu())
    model.zero_grad(set_to_none=True)
    return torch.stack(grads)


def exact_projection(
    grads: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    blocks: list[tuple[int, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (n, P) normalised and projected in float64: z (n, K) and ``‖G‖²`` (n,)."""
    k = blocks[0][1].shape[0]
    z = torch.zeros(grads.shape[0], k, dtype=torch.float64)
    gnorm2 = torch.zeros(grads.shape[0], dtype=torch.float64)
    for start, block in blocks:
        rows = slice(start, start + block.shape[1])
        normalised = (grads[:, rows].double() - mean[rows].double()) / scale[rows].double()
        gnorm2 += normalised.square().sum(dim=1)
        z += normalised @ block.T.cpu().double()
    return z, gnorm2


def floor_pass(model: nn.Module, params: list[nn.Parameter], images: torch.Tensor, batch: int):
    """Batched forward and backward of ``Σ E`` with nothing per sample."""
    for i in range(0, images.shape[0], batch):
        with torch.enable_grad():
            total = energy(model(images[i : i + batch])).sum()
            torch.autograd.grad(total, params)


def projection_alone(
    device: torch.device, projection: BlockedProjection, batch: int, size: int, repeats: int = 5
) -> float:
    """Seconds per image of the engine's projection product alone over all ``size`` rows: its
    GEMM on a batch's tile already centred (and already in the basis dtype), timed on the
    first ``PROBE_COLUMNS`` rows and scaled to ``size``. No centring, norms or cast."""
    projector = projection.projectors[0]
    weight_t = projector.parts[0]
    columns = min(PROBE_COLUMNS, weight_t.shape[1])
    weight_t = weight_t[:, :columns]
    tile = torch.randn(batch, columns, generator=torch.Generator().manual_seed(0))
    tile = tile.to(device, weight_t.dtype)
    projector._product_t(weight_t, tile)  # warm-up
    best = min(timed(device, projector._product_t, weight_t, tile)[0] for _ in range(repeats))
    return best * size / columns / batch


def engine_embed(
    engine: LayerGradients, projection: BlockedProjection, images: torch.Tensor, batch: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine batch by batch: (N, K) float64 reduced gradients and (N,) ``‖G‖²``."""
    z = torch.zeros(images.shape[0], k, dtype=torch.float64, device=images.device)
    gnorm2 = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    for i in range(0, images.shape[0], batch):
        engine.capture(images[i : i + batch])
        z_batch, gnorm2_batch = z[i : i + batch], gnorm2[i : i + batch]
        for start, tile in engine.tiles():
            projection.add(start, tile, z_batch, gnorm2_batch)
    return z, gnorm2


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|."""
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


# -- report ----------------------------------------------------------------------------------


def format_table(results: list[Result], fp32_peak: float) -> str:
    header = (
        f"{'K':>4}  {'method':<14}{'images/s':>10}{'ms/image':>11}{'x loop':>9}{'x floor':>9}"
        f"{'useful GFLOP/s':>16}{'of fp32 peak':>14}{'peak mem MiB':>14}{'CPU use':>9}"
    )
    lines = [header, "-" * len(header)]
    for k in sorted({r.k for r in results}):
        group = {r.method: r for r in results if r.k == k}
        loop, floor = group["loop"], group["floor"]
        for r in group.values():
            lines.append(
                f"{k:>4}  {r.method:<14}{r.images_per_s:>10.2f}{r.ms_per_image:>11.2f}"
                f"{r.images_per_s / loop.images_per_s:>9.2f}"
                f"{r.images_per_s / floor.images_per_s:>9.2f}"
                f"{r.useful_gflops:>16.1f}{r.useful_gflops * 1e9 / fp32_peak:>14.2f}"
                f"{r.peak_memory_bytes / 2**20:>14.0f}{100 * r.cpu_share:>8.0f}%"
            )
        lines.append("")
    return "\n".join(lines)


def engine_bounds(results: list[Result], alone: dict[tuple[int, str], float]) -> dict:
    """Lower bound on the engine's seconds per image, per (K, dtype): the floor's time plus the
    projection product alone (``alone``, seconds per image)."""
    floor = {r.k: r.seconds / r.images for r in results if r.method == "floor"}
    return {(k, dtype): floor[k] + seconds for (k, dtype), seconds in alone.items()}


def shown(value: float, target: float) -> str:
    """``value`` to 2 decimals, or as many more as it takes not to round onto the other side
    of ``target`` (5.9997 against a goal of 6 reads 5.9997, not 6.00)."""
    digits = 2
    while digits < 8 and (round(value, digits) >= target) != (value >= target):
        digits += 1
    return f"{value:.{digits}f}"


def goal_checks(
    results: list[Result], fp32_peak: float, bounds: dict[tuple[int, str], float]
) -> list[dict]:
    """Each goal, per basis dtype and K: the measured value, whether it is met, and the best
    value the lower bound on the engine's time allows (``reachable`` false: out of reach)."""
    by = {(r.k, r.method): r for r in results}
    checks = []

    def check(goal: str, target: float, value: float, best: float) -> None:
        checks.append(
            {
                "goal": goal,
                "target": target,
                "value": value,
                "met": value >= target,
                "bound": best,
                "reachable": best >= target,
            }
        )

    for dtype in ("fp32", "bf16"):
        method = f"engine {dtype}"
        for k, goal in ((50, GOALS["speedup_k50"]), (200, GOALS["speedup_k200"])):
            if (k, method) in by:
                loop_seconds = by[k, "loop"].seconds / by[k, "loop"].images
                value = by[k, method].images_per_s / by[k, "loop"].images_per_s
                best = loop_seconds / bounds[k, dtype]
                check(f"engine ({dtype} basis) / loop at K={k}", goal, value, best)
    for dtype, key in (
        ("fp32", "fp32_peak_fraction_fp32_basis"),
        ("bf16", "fp32_peak_fraction_bf16_basis"),
    ):
        for k in sorted({r.k for r in results}):
            result = by[k, f"engine {dtype}"]
            value = result.useful_gflops * 1e9 / fp32_peak
            best = result.useful_flops_per_image / bounds[k, dtype] / fp32_peak
            check(f"useful rate / fp32 peak, {dtype} basis, K={k}", GOALS[key], value, best)
    return checks


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=128, help="images for the batched methods")
    parser.add_argument("--loop-images", type=int, default=16, help="images for the loop")
    parser.add_argument("--ks", default="10,50,200", help="comma-separated basis widths K")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of (b) and (c)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each method; the best counts"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    if min(args.images, args.loop_images, args.batch_size, args.repeats, *args.ks) < 1:
        parser.error("--images, --loop-images, --batch-size, --repeats and --ks must be positive")
    args.loop_images = min(args.loop_images, args.images)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    began = time.perf_counter()
    info = machine_info(device)
    print(f"machine: {describe(info)}")
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (other busy processes skew the timings)")

    # The peak is measured before the methods and again after each K's rounds, and the best
    # counts: one measurement disturbed by other work would understate it and flatter every rate.
    peak_runs: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def measure_peaks(when: str) -> None:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peak_runs[name].append(matmul_peak(dtype, device))
        print(
            f"matmul peak {when} (2048x2048 @ 2048x2048, best of 8): "
            f"fp32 {peak_runs['fp32'][-1] / 1e9:.1f} GFLOP/s, "
            f"bf16 {peak_runs['bf16'][-1] / 1e9:.1f} GFLOP/s",
            flush=True,
        )

    measure_peaks("before")

    torch.manual_seed(args.seed)
    model = load_model("cifar_resnet18", device=device).module.eval()
    selection = select_parameters(model)
    named = dict(model.named_parameters())
    params = [named[n] for n in selection.names]
    size = selection.size
    images = torch.randn(
        args.images, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1)
    ).to(device)
    loop_images = images[: args.loop_images]
    flops = forward_flops(model, images[:1])
    batch = args.batch_size
    print(
        f"model: cifar_resnet18, P = {size:,} parameters, forward {flops / 1e9:.3f} GFLOP/image; "
        f"{args.images} images in batches of {batch}, loop on {args.loop_images}, "
        f"device {device}"
    )
    calibration = torch.randn(
        8, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 2)
    ).to(device)
    mean_cpu, scale_cpu = calibrated_normalisation(model, params, calibration, args.seed + 3)
    mean, scale = mean_cpu.to(device), scale_cpu.to(device)
    engine = LayerGradients(model, selection)

    results: list[Result] = []
    errors: dict[int, dict] = {}
    alone: dict[tuple[int, str], float] = {}  # projection product alone, seconds per image

    def record(k: int, method: str, n: int, timing: Timing, useful: float) -> Result:
        result = Result(
            k, method, n, timing.best, useful, timing.peak_memory, timing.cpu_share, timing.runs
        )
        results.append(result)
        each = ", ".join(f"{1e3 * r / n:.1f}" for r in timing.runs)
        print(
            f"  K={k:<4} {method:<12} {result.ms_per_image:9.2f} ms/image best of [{each}]  "
            f"(CPU use {100 * timing.cpu_share:.0f}%, "
            f"peak memory {result.peak_memory_bytes / 2**20:,.0f} MiB)",
            flush=True,
        )
        return result

    reference_grads = single_image_gradients(model, params, loop_images)
    engine.capture(images[:batch])
    sample_bytes = engine.sample_bytes()
    print(
        f"engine working memory (its own estimate): {sample_bytes / 2**20:.1f} MiB per image, "
        f"{batch * sample_bytes / 2**20:,.0f} MiB per batch of {batch}"
    )

    for k in args.ks:
        project_flops = 2.0 * size * k
        useful = 3.0 * flops + project_flops
        seconds, _, blocks = timed(device, orthonormal_basis_blocks, size, k, args.seed + 100 + k)
        print(f"  K={k:<4} basis {size:,} x {k} built in {seconds:.1f} s", flush=True)
        blocks = [(s, b.to(device)) for s, b in blocks]
        projections = {
            dtype: blocked_projection(blocks, mean_cpu, scale_cpu, torch_dtype, device)
            for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
        methods = {
            "floor": (args.images, 3.0 * flops, floor_pass, (model, params, images, batch)),
            "loop": (
                args.loop_images,
                useful,
                loop_embed,
                (model, params, loop_images, mean, scale, blocks),
            ),
            **{
                f"engine {dtype}": (
                    args.images,
                    useful,
                    engine_embed,
                    (engine, projection, images, batch, k),
                )
                for dtype, projection in projections.items()
            },
        }
        # Warm-up: first-touch page faults and lazy initialisation stay out of the timings.
        floor_pass(model, params, images[:batch], batch)
        loop_embed(model, params, loop_images[:1], mean, scale, blocks)
        for projection in projections.values():
            engine_embed(engine, projection, images[:batch], batch, k)
        timings = timed_rounds(
            device,
            args.repeats,
            {name: (run, run_args) for name, (_, _, run, run_args) in methods.items()},
        )
        for name, (n, work, _, _) in methods.items():
            record(k, name, n, timings[name], work)
        for dtype, projection in projections.items():
            alone[k, dtype] = projection_alone(device, projection, batch, size)
        print(
            f"  K={k:<4} projection product alone: "
            + ", ".join(
                f"{dtype} {1e3 * alone[k, dtype]:.2f} ms/image "
                f"({project_flops / alone[k, dtype] / 1e9:.0f} GFLOP/s)"
                for dtype in projections
            ),
            flush=True,
        )
        z_loop, gnorm2_loop = timings["loop"].value
        outputs = {dtype: timings[f"engine {dtype}"].value for dtype in projections}
        # untimed: the loop's images one at a time, as the loop sees them
        single = engine_embed(engine, projections["fp32"], loop_images, 1, k)
        del projections, methods, timings
        z_exact, gnorm2_exact = exact_projection(reference_grads, mean_cpu, scale_cpu, blocks)
        del blocks
        measure_peaks(f"after K={k}")

        n = args.loop_images
        z32, gnorm2_32 = outputs["fp32"]
        z16 = outputs["bf16"][0]
        z1, gnorm2_1 = single
        errors[k] = {
            "engine_single_vs_exact_z": relative_error(z1.cpu(), z_exact),
            "engine_single_vs_exact_gnorm2": relative_error(gnorm2_1.cpu(), gnorm2_exact),
            "engine_single_vs_loop_z": relative_error(z1, z_loop),
            "engine_batched_vs_loop_z": relative_error(z32[:n], z_loop),
            "engine_batched_vs_loop_gnorm2": relative_error(gnorm2_32[:n], gnorm2_loop),
            "engine_bf16_vs_fp32_z": relative_error(z16, z32),
            "loop_vs_exact_z": relative_error(z_loop.cpu(), z_exact),
            "engine_bf16_vs_exact_z": relative_error(z16[:n].cpu(), z_exact),
            "z_spread": float(z_exact.std(dim=0).max() / z_exact.abs().max()),
        }
        print(
            f"  K={k:<4} check: engine vs exact {errors[k]['engine_single_vs_exact_z']:.1e}, "
            f"batched engine vs loop {errors[k]['engine_batched_vs_loop_z']:.1e}, "
            f"bf16 vs fp32 {errors[k]['engine_bf16_vs_fp32_z']:.1e}",
            flush=True,
        )

    fp32_peak, bf16_peak = max(peak_runs["fp32"]), max(peak_runs["bf16"])
    print(
        f"\nmatmul peak, best of every measurement: fp32 {fp32_peak / 1e9:.1f} GFLOP/s, "
        f"bf16 {bf16_peak / 1e9:.1f} GFLOP/s (the rates below are against the fp32 peak)\n"
    )
    print(format_table(results, fp32_peak))
    print(
        "useful work per image = 3 x forward FLOPs + 2·P·K (the floor: 3 x forward FLOPs);\n"
        "x loop, x floor = images/s over that method's images/s; CPU use = process CPU time "
        "over wall time x torch threads (well below 100% when other processes compete);\n"
        "peak memory = "
        + (
            "max allocated on the GPU during the method"
            if device.type == "cuda"
            else "the process's peak RSS during the method's runs (on Linux; elsewhere the "
            "peak so far), the bases of both dtypes included"
        )
    )

    print(
        f"\ncorrectness on the loop's {args.loop_images} images (relative max error, "
        "max|Δ|/max|reference|): 'exact' = the loop's gradients normalised and projected in "
        "float64; 'one at a time' = the engine fed those images singly (untimed); 'batched' = "
        "the timed run; engine results use the float32 basis unless marked bf16"
    )
    correct = True
    for k, err in errors.items():
        verdicts = [
            ("engine one at a time vs exact: z", "engine_single_vs_exact_z", EXACT_TOLERANCE),
            (
                "engine one at a time vs exact: |G|^2",
                "engine_single_vs_exact_gnorm2",
                EXACT_TOLERANCE,
            ),
            ("engine one at a time vs loop: z", "engine_single_vs_loop_z", SINGLE_TOLERANCE),
            ("engine batched vs loop: z", "engine_batched_vs_loop_z", BATCHED_TOLERANCE),
            ("engine batched vs loop: |G|^2", "engine_batched_vs_loop_gnorm2", BATCHED_TOLERANCE),
            (
                "engine bf16 vs fp32, batched: z (all images)",
                "engine_bf16_vs_fp32_z",
                BF16_TOLERANCE,
            ),
            ("loop vs exact: z (for reference)", "loop_vs_exact_z", None),
            ("engine bf16 batched vs exact: z (for reference)", "engine_bf16_vs_exact_z", None),
            ("image-to-image spread of z (std/max)", "z_spread", None),
        ]
        print(f"  K={k}")
        for label, key, tolerance in verdicts:
            verdict = ""
            if tolerance is not None:
                ok = err[key] <= tolerance
                correct &= ok
                verdict = f"{'ok' if ok else 'FAIL'} (tolerance {tolerance:.0e})"
            print(f"    {label:<50}{err[key]:10.2e}  {verdict}")

    bounds = engine_bounds(results, alone)
    print(
        "\nlower bound on the engine = floor + projection product alone (ms/image; per-sample "
        "products taken as no dearer than the floor's summed ones, centring, norms and casts "
        "as free):"
    )
    for (k, dtype), seconds in sorted(bounds.items()):
        print(f"  K={k:<4} {dtype}  {1e3 * seconds:7.2f}")
    checks = goal_checks(results, fp32_peak, bounds)
    print("\ngoals (bound: the best value the lower bound allows)")
    for check in checks:
        verdict = "met" if check["met"] else "NOT met"
        if not check["reachable"]:
            verdict += ", out of reach on this machine"
        print(
            f"  {check['goal']:<44} {shown(check['value'], check['target']):>7}  "
            f"(goal >= {check['target']:.1f}, "
            f"bound {check['bound']:.2f})  {verdict}"
        )

    total_seconds = time.perf_counter() - began
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load_after = os.getloadavg()
    print(
        f"\npeak RSS {rss / 2**30:.2f} GiB; total run time {total_seconds:.0f} s; "
        f"load average after: {load_after[0]:.2f}"
    )

    report = {
        "machine": info,
        "settings": {
            "model": "cifar_resnet18",
            "parameters": size,
            "images": args.images,
            "loop_images": args.loop_images,
            "batch_size": batch,
            "repeats": args.repeats,
            "ks": args.ks,
            "seed": args.seed,
        },
        "engine_sample_bytes": sample_bytes,
        "forward_flops_per_image": flops,
        "matmul_peak_flops": {"float32": fp32_peak, "bfloat16": bf16_peak},
        "matmul_peak_measurements": {"float32": peak_runs["fp32"], "bfloat16": peak_runs["bf16"]},
        "results": [
            {
                **asdict(r),
                "images_per_s": r.images_per_s,
                "ms_per_image": r.ms_per_image,
                "useful_gflops": r.useful_gflops,
                "fraction_of_fp32_peak": r.useful_gflops * 1e9 / fp32_peak,
            }
            for r in results
        ],
        "errors": {str(k): v for k, v in errors.items()},
        "correct": correct,
        "projection_alone_seconds_per_image": {
            f"{dtype}_k{k}": seconds for (k, dtype), seconds in alone.items()
        },
        "engine_lower_bound_seconds_per_image": {
            f"{dtype}_k{k}": seconds for (k, dtype), seconds in bounds.items()
        },
        "goals": checks,
        "peak_rss_bytes": rss,
        "load_average": {"before": load_before, "after": load_after},
        "total_seconds": total_seconds,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"results written to {args.json}")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["correct"] else 1)
