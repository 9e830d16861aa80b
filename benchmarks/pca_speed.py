"""Speed and quality of gradcli's PCA subspace against the paper's jvp/vjp power iteration.

On CIFAR ResNet-18 (random weights, eval mode, seeded) and a few hundred seeded structured
32×32 images, with the same normalisation ``G(x) = (g(x) - M) / sqrt(var)`` (M and var from
gradcli's statistics pass), K = 50, it runs side by side in one process:

(a) gradcli — ``Run.extract_subspace(method="pca")``: randomised subspace iteration with
    K + p columns, one pass over the data per iteration (per batch the engine's tiles give
    ``U = G_b V`` and then ``Y += G_bᵀ U`` from the same backward), then Rayleigh–Ritz.
    It is timed from inside one run through its progress reports (one per batch): seconds
    per iteration = (end of iteration T - end of iteration 1) / (T - 1), so each counted
    iteration holds a data pass and the orthonormalisation (the checkpoint write of the
    block runs in a background thread beside the next pass); wrapping gradcli's
    dense-algebra helpers and store writes splits that time up. The statistics
    pass runs first, in its own call, and is shared by both methods.
(b) paper — the power iteration of Wu et al. (TPAMI 2024, Algorithms 2-4): per batch, one
    ``torch.func.jvp`` of the per-sample energies per direction for ``G V``
    (``G v = g·(v/s) - M·(v/s)``), one ``torch.func.vjp`` call per column for ``Gᵀ U``
    (``(Σ_i u_i g_i - M Σ_i u_i) / s``), then QR; K columns, seeded Gaussian start, the
    same T. A full iteration of it is far too slow for a small CPU, so by default it is
    timed on one batch and a few directions, just before and just after gradcli's run (the
    mean of the two), and extrapolated linearly in directions and samples; its basis is
    then the same iteration with ``G V`` and ``Gᵀ U`` evaluated exactly by the engine, and
    the jvp/vjp products are checked against those on the timed batch. ``--paper-full``
    runs the jvp/vjp iteration itself end to end instead.

Times are wall-clock and, beside them, this process's CPU seconds: on a shared machine the
load of other processes changes during a run, and the CPU-time ratio is the steadier one.

Both bases are then scored by the variance they capture, ``trace(VᵀCV) = ‖G V‖_F² / N``, in
one engine pass. ``--pca200`` is a separate mode: gradcli PCA with K = 200 on K + p + 1
samples (fewer would narrow the block to the rank of G), reporting the peak resident memory;
it needs about 21 GiB free and says so instead of starting without it.

Run from the repository root (the default takes about 15 minutes on 2 cores)::

    python benchmarks/pca_speed.py [--samples 256] [--iterations 2] [--json out.json]
    python benchmarks/pca_speed.py --pca200 [--pca200-samples 211]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.func import functional_call, jvp, vjp

from gradcli import data as data_mod
from gradcli.budget import PCA_SHARE, default_memory_budget
from gradcli.grads import (
    LayerGradients,
    Projector,
    energy,
    select_parameters,
)
from gradcli.models import load_model
from gradcli.run import Run
from gradcli.stages import pca as run_module
from gradcli.subspace import random_start

from machine import describe, machine_info, meminfo_bytes

MODEL = "cifar_resnet18"
SPEEDUP_GOAL = 20.0
VARIANCE_TOLERANCE = 1e-3  # gradcli's captured variance may trail the paper's by this fraction
PRODUCT_TOLERANCE = 1e-3  # relative error of the jvp/vjp products against the engine's


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- machine and data ------------------------------------------------------------------------


def stamp() -> np.ndarray:
    """Now, as (wall seconds, CPU seconds of this process over all its threads).

    Other processes on the machine slow the wall clock of both methods unevenly over a long
    run; CPU time is far less sensitive to them, so both are reported.
    """
    return np.array([time.perf_counter(), time.process_time()])


def pair(seconds: np.ndarray) -> dict[str, float]:
    """(wall, CPU) seconds for JSON."""
    return {"wall": float(seconds[0]), "cpu": float(seconds[1])}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_images(path: str, count: int, seed: int) -> None:
    """Seeded structured images: smooth colour fields plus texture, uint8 (count, 32, 32, 3).

    Smooth low-frequency fields give the gradients shared structure, so the
    captured-variance comparison is not made on white noise.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(
        coarse, size=(32, 32), mode="bicubic", align_corners=False
    )
    texture = 0.15 * torch.randn(count, 3, 32, 32, generator=generator)
    images = ((smooth + texture).clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.arange(count)[torch.randperm(count, generator=generator)] % 10
    np.savez(path, x=images.permute(0, 2, 3, 1).numpy(), y=labels.numpy())


def load_batches(run: Run, spec: str, batch_size: int) -> list[torch.Tensor]:
    """The model inputs, preprocessed exactly as gradcli does, in gradcli's batch order."""
    source = run.resolve(spec, default_split="train")
    loader = data_mod.make_loader(source, run.model.preprocess, batch_size=batch_size)
    return [x for x, _ in loader]


# -- the paper's algorithm ---------------------------------------------------------------------


class JvpVjpProducts:
    """``G_b V`` by one forward-mode jvp per direction, ``G_bᵀ U`` by one vjp per column.

    The normalisation is applied as in the paper: ``G v = g·(v/s) - M·(v/s)`` and
    ``Gᵀ u = (Σ_i u_i g_i - M Σ_i u_i) / s``. One reverse-mode forward per batch serves all
    vjp calls (the cheapest faithful reading: the pullback is reused, not re-traced).
    """

    def __init__(self, module: torch.nn.Module, mean: torch.Tensor, scale: torch.Tensor):
        self.module = module.eval()
        selection = select_parameters(module)
        self.names = selection.names
        self.shapes = selection.shapes
        self.sizes = selection.sizes
        named = dict(module.named_parameters())
        self.params = {n: named[n].detach() for n in self.names}
        self.fixed = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.fixed.update(module.named_buffers())
        self.mean = mean.float()
        self.inv_scale = (1.0 / scale.double()).float()

    def _energies(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return energy(functional_call(self.module, {**params, **self.fixed}, (x,)))

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(flat, self.sizes)
        return {
            n: piece.view(shape)
            for n, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def apply(self, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """``G_b v`` for one direction v (P,) float32 -> (B,) float32, by one jvp."""
        scaled = direction * self.inv_scale
        tangent = self._unflatten(scaled)
        _, derivative = jvp(lambda p: self._energies(p, x), (self.params,), (tangent,))
        return derivative - torch.dot(self.mean, scaled)

    def pullback(self, x: torch.Tensor):
        """One reverse-mode forward of a batch; returns ``u (B,) -> Gᵀ u (P,) float32``."""
        _, vjp_fn = vjp(lambda p: self._energies(p, x), self.params)

        def transpose(weights: torch.Tensor) -> torch.Tensor:
            (grads,) = vjp_fn(weights)
            summed = torch.cat([grads[n].reshape(-1) for n in self.names])
            return (summed - self.mean * weights.sum()) * self.inv_scale

        return transpose

    def accumulate(self, x: torch.Tensor, block: torch.Tensor, total: torch.Tensor) -> None:
        """``total += G_bᵀ (G_b V)`` for V = block (P, w): w jvps and w vjp calls."""
        reduced = torch.stack([self.apply(x, block[:, j]) for j in range(block.shape[1])], 1)
        transpose = self.pullback(x)
        for j in range(block.shape[1]):
            total[:, j] += transpose(reduced[:, j])


class EngineProducts:
    """The same products evaluated exactly by gradcli's per-layer engine (one capture)."""

    def __init__(self, module: torch.nn.Module, mean: torch.Tensor, scale: torch.Tensor):
        self.engine = LayerGradients(module, select_parameters(module))
        self.mean, self.scale = mean, scale

    def _reduce(self, projector: Projector, batch: int) -> torch.Tensor:
        reduced = torch.zeros(batch, projector.k, dtype=torch.float64)
        unused = torch.zeros(batch, dtype=torch.float64)
        for start, tile in self.engine.tiles():
            projector.add(start, tile, reduced, unused)
        return reduced

    def _transpose(self, projector: Projector, weights: torch.Tensor, total: torch.Tensor) -> None:
        for start, tile in self.engine.tiles():
            rows = slice(start, start + tile.shape[1])
            total[rows].addmm_(projector.normalise(start, tile).T, weights)

    def reduce(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """``G_b V``: (B, w) float64 for V (P, w) float32."""
        self.engine.capture(x)
        return self._reduce(Projector(self.mean, self.scale, block), x.shape[0])

    def transpose(self, x: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> None:
        """``total += G_bᵀ U`` for U (B, w) float32, total (P, w) float32."""
        self.engine.capture(x)
        self._transpose(Projector(self.mean, self.scale, total), weights, total)

    def accumulate(self, x: torch.Tensor, block: torch.Tensor, total: torch.Tensor) -> None:
        """``total += G_bᵀ (G_b V)`` from one capture of the batch."""
        self.engine.capture(x)
        projector = Projector(self.mean, self.scale, block)
        weights = self._reduce(projector, x.shape[0]).float()
        self._transpose(projector, weights, total)


def power_iteration(
    products: JvpVjpProducts | EngineProducts,
    batches: list[torch.Tensor],
    num_params: int,
    k: int,
    seed: int,
    iterations: int,
) -> tuple[torch.Tensor, list[float], list[float]]:
    """``V ← QR(Σ_b G_bᵀ G_b V)``, ``iterations`` times from gradcli's seeded Gaussian start.

    Returns the final V (P, K) float32 and the (wall, CPU) seconds of each iteration and
    of its QR.
    """
    block = random_start(num_params, k, seed)
    seconds, qr_seconds = [], []
    for iteration in range(iterations):
        began = stamp()
        total = torch.zeros_like(block)
        for number, x in enumerate(batches):
            products.accumulate(x, block, total)
            log(f"  paper iteration {iteration + 1}/{iterations}, batch {number + 1}")
        qr_began = stamp()
        del block  # QR's output and workspace take its place
        block, _ = torch.linalg.qr(total)
        del total
        qr_seconds.append(stamp() - qr_began)
        seconds.append(stamp() - began)
    return block, seconds, qr_seconds


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def time_paper_products(
    paper: JvpVjpProducts, x: torch.Tensor, block: torch.Tensor
) -> tuple[dict[str, np.ndarray], torch.Tensor, torch.Tensor]:
    """Time the paper's per-batch work on one batch for the columns of ``block`` (P, d).

    A jvp and a vjp run untimed first (first calls build kernels and caches). Returns the
    (wall, CPU) seconds of a jvp per direction, of the batch's reverse-mode forward and of a
    vjp call per column, with the products ``G_b V`` (B, d) and ``G_bᵀ G_b V`` (P, d).
    """
    directions = block.shape[1]
    paper.apply(x, block[:, 0])
    paper.pullback(x)(torch.ones(x.shape[0]))

    began = stamp()
    reduced = torch.stack([paper.apply(x, block[:, j]) for j in range(directions)], 1)
    jvp_seconds = (stamp() - began) / directions

    began = stamp()
    transpose = paper.pullback(x)
    forward_seconds = stamp() - began

    total = torch.zeros(block.shape[0], directions)
    began = stamp()
    for j in range(directions):
        total[:, j] += transpose(reduced[:, j])
    vjp_seconds = (stamp() - began) / directions
    timings = {"jvp_per_direction": jvp_seconds, "vjp_forward": forward_seconds}
    timings["vjp_per_column"] = vjp_seconds
    return timings, reduced, total


def check_paper_products(
    exact: EngineProducts,
    x: torch.Tensor,
    block: torch.Tensor,
    reduced: torch.Tensor,
    total: torch.Tensor,
) -> dict[str, float]:
    """Relative errors of the jvp ``G_b V`` and vjp ``G_bᵀ U`` against the engine's."""
    reference_reduced = exact.reduce(x, block)
    reference_total = torch.zeros_like(total)
    exact.transpose(x, reduced, reference_total)
    return {
        "jvp_relative_error": relative_error(reduced, reference_reduced),
        "vjp_relative_error": relative_error(total, reference_total),
    }


def paper_seconds_per_iteration(
    timings: dict[str, np.ndarray], k: int, samples: int, batch: int, qr: np.ndarray
) -> np.ndarray:
    """(wall, CPU) seconds of one paper iteration, linear in directions and samples:
    per batch one reverse-mode forward, K jvps and K vjp calls; then the QR."""
    per_batch = timings["vjp_forward"] + k * (
        timings["jvp_per_direction"] + timings["vjp_per_column"]
    )
    return per_batch * samples / batch + qr


# -- captured variance -------------------------------------------------------------------------


def captured_variance(
    module: torch.nn.Module,
    batches: list[torch.Tensor],
    mean: torch.Tensor,
    scale: torch.Tensor,
    bases: dict[str, torch.Tensor],
) -> tuple[dict[str, float], float]:
    """``‖G V‖_F² / N`` for each basis and ``trace(C) = Σ‖G(x)‖² / N``, in one engine pass."""
    engine = LayerGradients(module, select_parameters(module))
    projectors = {name: Projector(mean, scale, basis) for name, basis in bases.items()}
    captured = dict.fromkeys(bases, 0.0)
    total, count = 0.0, 0
    for x in batches:
        engine.capture(x)
        reduced = {
            name: torch.zeros(x.shape[0], basis.shape[1], dtype=torch.float64)
            for name, basis in bases.items()
        }
        norms = {name: torch.zeros(x.shape[0], dtype=torch.float64) for name in bases}
        for start, tile in engine.tiles():
            for name, projector in projectors.items():
                projector.add(start, tile, reduced[name], norms[name])
        for name in bases:
            captured[name] += float(reduced[name].square().sum())
        total += float(next(iter(norms.values())).sum())
        count += x.shape[0]
    return {name: value / count for name, value in captured.items()}, total / count


# -- the modes ---------------------------------------------------------------------------------

STATS_STAGE = "gradient statistics"  # gradcli's progress labels; advanced per sample
PCA_STAGE = "PCA"  # advanced per batch, (iterations + 1) x batches in all


class TimingProgress:
    """A progress sink that records when each stage opens and each advance lands.

    gradcli advances its PCA stage once per batch, so the times at multiples of the batch
    count mark the ends of the iterations: gradcli is timed from inside one run.
    """

    def __init__(self) -> None:
        self.marks: dict[str, list[tuple[int, np.ndarray]]] = {}

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator:
        marks = self.marks.setdefault(description, [(0, stamp())])
        done = marks[-1][0]

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            marks.append((done, stamp()))

        yield advance

    def note(self, message: str) -> None:
        log(message)

    def time_at(self, description: str, count: int) -> np.ndarray:
        """(wall, CPU) when the stage first reached ``count`` (its opening for 0)."""
        return next(t for done, t in self.marks[description] if done >= count)

    def seconds(self, description: str, first: int, last: int) -> np.ndarray:
        return self.time_at(description, last) - self.time_at(description, first)


class Stopwatch:
    """Times calls of functions that gradcli's PCA makes, by wrapping them for one run.

    Wrapping adds a clock read per call and changes nothing else; it splits an iteration
    into its data pass, its orthonormalisation and its checkpoint write.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    def wrap(self, label: str | Callable[..., str], function: Callable) -> Callable:
        """``function`` that also records its seconds under ``label`` (or ``label(*args)``)."""

        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                name = label(*args) if callable(label) else label
                self.calls.setdefault(name, []).append(time.perf_counter() - began)

        return timed

    @contextlib.contextmanager
    def watching(self, run: Run) -> Iterator[None]:
        """Wrap the PCA stage's dense-algebra helpers and ``run.store.write`` meanwhile."""
        names = ("random_start", "orthonormalise_", "rayleigh_ritz")
        saved = {name: getattr(run_module, name) for name in names}
        for name, function in saved.items():
            setattr(run_module, name, self.wrap(name, function))

        def write_label(path: str, *_) -> str:
            # Alternating slots (V0, V1, partial0, ...) are one kind of write.
            return f"write {path.rstrip('0123456789')}"

        run.store.write = self.wrap(write_label, run.store.write)
        try:
            yield
        finally:
            for name, function in saved.items():
                setattr(run_module, name, function)
            del run.store.write


def timed_extract(run: Run, spec: str, **options) -> tuple[float, dict]:
    began = time.perf_counter()
    result = run.extract_subspace(spec, **options)
    return time.perf_counter() - began, result


def pca_memory(num_params: int, width: int) -> tuple[int, int]:
    """Bytes of gradcli's PCA block and accumulator, and a memory budget that admits them.

    gradcli lets the block and accumulator use ``PCA_SHARE`` of its memory budget.
    """
    need = num_params * width * 8 + num_params * 8
    return need, math.ceil(need / PCA_SHARE / 2**30 + 0.5) * 2**30


def count_parameters() -> int:
    return select_parameters(load_model(MODEL).module).size


def compare(args: argparse.Namespace, workdir: str) -> dict:
    """The side-by-side run: gradcli PCA against the paper's power iteration."""
    if args.iterations < 2:
        raise SystemExit("--iterations must be at least 2 (per-iteration time is a difference)")
    if args.samples < 10:
        raise SystemExit("--samples must be at least 10 (one per class for the statistics)")
    torch.manual_seed(args.seed)
    num_params = count_parameters()
    _, budget = pca_memory(num_params, args.k + args.oversample)
    # gradcli's own default (half the available memory) unless that cannot hold the block.
    budget = max(budget, default_memory_budget())
    images = os.path.join(workdir, "images.npz")
    write_images(images, args.samples, args.seed)
    spec = f"npz:{images}"
    timing = TimingProgress()
    run = Run(
        os.path.join(workdir, "store"),
        memory_budget=args.memory_budget or budget,
        progress=timing,
    )
    run.set_model(MODEL)
    module = run.model.module
    options = {"batch_size": args.batch_size, "seed": args.seed}
    load = {}

    # The statistics first (with the cheap average-gradient basis), so that the PCA call
    # below reuses them and the paper can be timed with the same M and var before it.
    log(f"gradcli: statistics pass over {args.samples} samples")
    run.extract_subspace(spec, method="avg", **options)
    stats_seconds = timing.seconds(STATS_STAGE, 0, args.samples)
    engine_batch = timing.marks[STATS_STAGE][1][0]  # gradcli's first statistics batch
    mean = torch.from_numpy(run.store.read("stats/mean"))
    scale = torch.from_numpy(run.store.read("stats/var")).sqrt()
    batches = load_batches(run, spec, engine_batch)
    paper = JvpVjpProducts(module, mean, scale)
    exact = EngineProducts(module, mean, scale)
    probe_x = batches[0][: args.paper_batch]
    probe_block = random_start(num_params, args.k, args.seed)[:, : args.directions].clone()

    log(f"paper: timing {args.directions} jvps and vjp calls on {len(probe_x)} samples (before)")
    load["paper probe before"] = os.getloadavg()[0]
    before, reduced, total = time_paper_products(paper, probe_x, probe_block)
    checks = check_paper_products(exact, probe_x, probe_block, reduced, total)
    del reduced, total

    log(f"gradcli: PCA, {args.iterations} iterations (statistics reused)")
    load["gradcli start"] = os.getloadavg()[0]
    stopwatch = Stopwatch()
    with stopwatch.watching(run):
        began = stamp()
        result = run.extract_subspace(
            spec,
            method="pca",
            k=args.k,
            oversample=args.oversample,
            iterations=args.iterations,
            overwrite=True,
            **options,
        )
        extract_seconds = stamp() - began
    load["gradcli end"] = os.getloadavg()[0]
    n_batches = timing.marks[PCA_STAGE][-1][0] // (args.iterations + 1)
    ends = [timing.time_at(PCA_STAGE, i * n_batches) for i in range(args.iterations + 2)]
    iteration_seconds = [b - a for a, b in zip(ends[:-2], ends[1:-1], strict=True)]
    gradcli_per_iteration = (ends[-2] - ends[1]) / (args.iterations - 1)
    orthonormalise = stopwatch.calls.get("orthonormalise_", [0.0])
    checkpoints = stopwatch.calls.get("write subspace/state/V", [0.0])
    # Iterations 2..T each hold one orthonormalisation; the block's checkpoint is written in
    # the background during the next pass, so it is not counted as a separate step.
    overhead = float(np.mean(orthonormalise[:-1] or [0.0]))
    eigenvalue_sum = float(run.store.read("subspace/eigenvalues").sum())

    log(f"paper: timing {args.directions} jvps and vjp calls on {len(probe_x)} samples (after)")
    load["paper probe after"] = os.getloadavg()[0]
    after, _, _ = time_paper_products(paper, probe_x, probe_block)
    del probe_block

    if args.paper_full:
        log(f"paper: full jvp/vjp power iteration, {args.iterations} iterations")
        paper_basis, seconds, qr_seconds = power_iteration(
            paper, batches, num_params, args.k, args.seed, args.iterations
        )
        paper_per_iteration = np.mean(seconds, axis=0)
        paper_timing = "measured: full jvp/vjp iterations over every batch"
        basis_source = "the jvp/vjp power iteration over all samples"
    else:
        log(f"paper basis: its iteration with exact engine products, {args.iterations} iterations")
        paper_basis, seconds, qr_seconds = power_iteration(
            exact, batches, num_params, args.k, args.seed, args.iterations
        )
        paper_timing = (
            f"extrapolated: {args.directions} jvps and {args.directions} vjp calls timed on "
            f"{len(probe_x)} samples before and after gradcli's run, averaged, scaled linearly "
            f"to K = {args.k} directions and {args.samples} samples, plus the measured QR"
        )
        basis_source = (
            "the paper's iteration (K columns, seeded Gaussian start, QR each iteration) with "
            "G V and G^T U evaluated exactly by the per-layer engine; the jvp/vjp products "
            "match those to the relative errors above"
        )
    qr = np.mean(qr_seconds, axis=0)
    estimates = {
        name: paper_seconds_per_iteration(t, args.k, args.samples, len(probe_x), qr)
        for name, t in (("before", before), ("after", after))
    }
    if not args.paper_full:
        paper_per_iteration = (estimates["before"] + estimates["after"]) / 2

    log("captured variance of both bases (one engine pass)")
    gradcli_basis = torch.from_numpy(run.store.read("subspace/basis"))
    captured, total_variance = captured_variance(
        module, batches, mean, scale, {"gradcli": gradcli_basis, "paper": paper_basis}
    )
    speedup = paper_per_iteration / gradcli_per_iteration
    variance_ratio = captured["gradcli"] / captured["paper"]
    equal_variance = variance_ratio >= 1 - VARIANCE_TOLERANCE
    return {
        "mode": "compare",
        "machine": machine_info(),
        "load_average_1min": load,
        "config": {
            "model": MODEL,
            "num_parameters": num_params,
            "samples": args.samples,
            "gradcli_pca_batches": int(n_batches),
            "engine_batch": int(engine_batch),
            "paper_timed_batch": int(len(probe_x)),
            "paper_directions_timed": args.directions,
            "k": args.k,
            "oversample": args.oversample,
            "iterations": args.iterations,
            "seed": args.seed,
        },
        "statistics_seconds": pair(stats_seconds),
        "gradcli": {
            "iteration_seconds": [pair(t) for t in iteration_seconds],
            "seconds_per_iteration": pair(gradcli_per_iteration),
            "data_pass_wall_seconds_per_iteration": float(gradcli_per_iteration[0] - overhead),
            "orthonormalise_wall_seconds": orthonormalise,
            "checkpoint_write_wall_seconds": checkpoints,
            "rayleigh_ritz_seconds": pair(ends[-1] - ends[-2]),
            "pca_seconds": pair(ends[-1] - ends[0]),
            "extract_seconds": pair(extract_seconds),
            "helper_wall_seconds": {name: sum(t) for name, t in stopwatch.calls.items()},
            "explained_variance": result["explained_variance"],
            "eigenvalue_sum": eigenvalue_sum,
        },
        "paper": {
            "timed_before": {name: pair(t) for name, t in before.items()},
            "timed_after": {name: pair(t) for name, t in after.items()},
            **checks,
            "seconds_per_iteration_from_before": pair(estimates["before"]),
            "seconds_per_iteration_from_after": pair(estimates["after"]),
            "qr_seconds": pair(qr),
            "seconds_per_iteration": pair(paper_per_iteration),
            "total_seconds": pair(paper_per_iteration * args.iterations),
            "timing": paper_timing,
            "basis": basis_source,
            "basis_iteration_seconds": [pair(t) for t in seconds],
        },
        "captured_variance": {
            "gradcli": captured["gradcli"],
            "paper": captured["paper"],
            "total": total_variance,
            "ratio_gradcli_to_paper": variance_ratio,
        },
        "speedup_per_iteration": pair(speedup),
        "goal": {
            "speedup": SPEEDUP_GOAL,
            "met_wall": bool(speedup[0] >= SPEEDUP_GOAL and equal_variance),
            "met_cpu": bool(speedup[1] >= SPEEDUP_GOAL and equal_variance),
            "products_agree": bool(max(checks.values()) < PRODUCT_TOLERANCE),
        },
        "peak_rss_bytes": peak_rss_bytes(),
    }


def pca200(args: argparse.Namespace, workdir: str) -> dict:
    """gradcli PCA with K = 200 on a few samples: does its block fit this machine?"""
    torch.manual_seed(args.seed)
    k, oversample = 200, args.oversample
    # G has rank at most N - 1, and gradcli narrows the block to it: K + p + 1 samples keep
    # the full K + p columns.
    samples = args.pca200_samples or k + oversample + 1
    images = os.path.join(workdir, "images.npz")
    write_images(images, samples, args.seed)
    spec = f"npz:{images}"
    num_params = count_parameters()
    need, budget = pca_memory(num_params, min(k + oversample, samples - 1))
    budget = args.memory_budget or budget
    available = meminfo_bytes("MemAvailable")
    info = machine_info()
    record = {
        "mode": "pca200",
        "machine": info,
        "config": {
            "model": MODEL,
            "num_parameters": num_params,
            "samples": samples,
            "k": k,
            "oversample": oversample,
            "iterations": 1,
            "memory_budget_bytes": budget,
        },
        "block_and_accumulator_bytes": need,
    }
    if available < need + (args.headroom_gib << 30) and not args.force:
        record["skipped"] = (
            f"only {available / 2**30:.1f} GiB available, the run needs about "
            f"{(need + (args.headroom_gib << 30)) / 2**30:.1f} GiB; pass --force to run anyway"
        )
        return record
    run = Run(os.path.join(workdir, "store"), memory_budget=budget)
    run.set_model(MODEL)
    log(f"gradcli PCA, K = {k}, {samples} samples, 1 iteration")
    stopwatch = Stopwatch()
    with stopwatch.watching(run):
        seconds, result = timed_extract(
            run,
            spec,
            method="pca",
            k=k,
            oversample=oversample,
            iterations=1,
            batch_size=args.batch_size or min(64, samples),
            seed=args.seed,
        )
    record.update(
        seconds=seconds,
        helper_seconds={name: sum(times) for name, times in stopwatch.calls.items()},
        basis_shape=list(run.store.shape("subspace/basis")),
        explained_variance=result["explained_variance"],
        peak_rss_bytes=peak_rss_bytes(),
    )
    return record


# -- report ------------------------------------------------------------------------------------


def machine_lines(info: dict) -> Iterator[str]:
    yield f"machine: {describe(info)}"
    yield (
        f"{info['memory_available_gib']} GiB available at the end, "
        f"load average {info['load_average']}"
    )


def both(seconds: dict[str, float], width: int = 8) -> str:
    """'wall s (CPU s)' for the report."""
    return f"{seconds['wall']:{width}.1f} s (CPU {seconds['cpu']:.1f} s)"


def report_compare(r: dict) -> Iterator[str]:
    c, g, p, v = r["config"], r["gradcli"], r["paper"], r["captured_variance"]
    t = c["iterations"]
    yield from machine_lines(r["machine"])
    loads = ", ".join(f"{name} {value:.1f}" for name, value in r["load_average_1min"].items())
    yield f"1-minute load average during the run: {loads}"
    yield (
        f"model: {c['model']} (random weights, {c['num_parameters']:,} parameters); "
        f"{c['samples']} structured 32x32 images, K = {c['k']}, {t} iterations, seed {c['seed']}"
    )
    yield "times are wall-clock, with this process's CPU seconds (both threads) in brackets"
    yield f"statistics pass (M, var; shared by both methods): {both(r['statistics_seconds'], 1)}"
    yield ""
    yield (
        f"gradcli PCA: K + p = {c['k'] + c['oversample']} columns, batches per pass: "
        f"{c['gradcli_pca_batches']}, engine tiles, Rayleigh-Ritz"
    )
    each = ", ".join(f"{s['wall']:.1f}" for s in g["iteration_seconds"])
    yield f"  iterations   : {each} s (one data pass each; the 2nd on also orthonormalise"
    yield "                 the previous block, whose checkpoint is written in the background)"
    yield f"  per iteration: {both(g['seconds_per_iteration'])}  (iterations 2..{t}, whole)"
    overhead = g["seconds_per_iteration"]["wall"] - g["data_pass_wall_seconds_per_iteration"]
    yield (
        f"    of which the data pass {g['data_pass_wall_seconds_per_iteration']:.1f} s, "
        f"orthonormalisation {overhead:.1f} s; checkpoint writes (background) "
        f"{float(np.mean(g['checkpoint_write_wall_seconds'] or [0.0])):.1f} s each"
    )
    yield f"  Rayleigh-Ritz: {both(g['rayleigh_ritz_seconds'])}  (last orthonormalise + a pass)"
    yield f"  PCA stage    : {both(g['pca_seconds'])}  <- total PCA time, {t} iterations"
    yield f"  PCA call     : {both(g['extract_seconds'])}  (also the seeded start, store writes)"
    helpers = ", ".join(f"{name} {secs:.1f}" for name, secs in g["helper_wall_seconds"].items())
    yield f"  timed helpers (wall s): {helpers}"
    yield ""
    yield f"paper power iteration: K = {c['k']} columns, jvp per direction, vjp per column, QR"
    for when in ("before", "after"):
        timed = p[f"timed_{when}"]
        yield (
            f"  timed {when:6}: jvp {timed['jvp_per_direction']['wall']:.2f} s/direction, "
            f"vjp forward {timed['vjp_forward']['wall']:.2f} s, "
            f"vjp {timed['vjp_per_column']['wall']:.2f} s/column on {c['paper_timed_batch']} "
            f"samples -> {p[f'seconds_per_iteration_from_{when}']['wall']:.1f} s/iteration"
        )
    yield f"  per iteration: {both(p['seconds_per_iteration'])}"
    yield f"    ({p['timing']}; QR {p['qr_seconds']['wall']:.1f} s)"
    yield f"  {t} iterations : {both(p['total_seconds'])}"
    yield (
        f"  products vs engine: jvp rel. err {p['jvp_relative_error']:.1e}, "
        f"vjp rel. err {p['vjp_relative_error']:.1e}"
    )
    yield f"  basis: {p['basis']}"
    yield ""
    yield "captured variance trace(V^T C V) = |G V|_F^2 / N (same data, same M and var)"
    yield (
        f"  gradcli: {v['gradcli']:.6g} ({v['gradcli'] / v['total']:.2%} of trace C = "
        f"{v['total']:.6g}); its Ritz values sum to {g['eigenvalue_sum']:.6g}"
    )
    yield f"  paper  : {v['paper']:.6g} ({v['paper'] / v['total']:.2%} of trace C)"
    yield f"  ratio gradcli / paper: {v['ratio_gradcli_to_paper']:.4f}"
    yield ""
    gs, ps, ratio = (
        g["seconds_per_iteration"],
        p["seconds_per_iteration"],
        r["speedup_per_iteration"],
    )
    yield (
        f"seconds per iteration: gradcli {gs['wall']:.1f}, paper {ps['wall']:.1f}; "
        f"paper / gradcli = {ratio['wall']:.1f}x wall-clock, {ratio['cpu']:.1f}x CPU time"
    )
    goal = r["goal"]
    verdict = {True: "MET", False: "NOT MET"}
    yield (
        f"goal: >= {goal['speedup']:.0f}x faster per iteration at equal or better captured "
        f"variance: {verdict[goal['met_wall']]} (wall-clock), {verdict[goal['met_cpu']]} (CPU)"
    )
    if not goal["products_agree"]:
        yield "WARNING: the jvp/vjp products disagree with the engine's; the comparison is suspect"
    yield f"peak RSS: {r['peak_rss_bytes'] / 2**30:.2f} GiB"


def report_pca200(r: dict) -> Iterator[str]:
    c = r["config"]
    yield from machine_lines(r["machine"])
    yield (
        f"gradcli PCA, K = {c['k']} + {c['oversample']}, {c['samples']} samples, 1 iteration, "
        f"{c['num_parameters']:,} parameters; memory budget {c['memory_budget_bytes'] / 2**30:.1f}"
        f" GiB (the block and accumulator may use {PCA_SHARE:.0%} of it)"
    )
    yield f"block + accumulator: {r['block_and_accumulator_bytes'] / 2**30:.2f} GiB"
    if "skipped" in r:
        yield f"NOT RUN: {r['skipped']}"
        return
    yield f"time: {r['seconds']:.1f} s; basis {r['basis_shape']}"
    helpers = ", ".join(f"{name} {secs:.1f} s" for name, secs in r["helper_seconds"].items())
    yield f"timed helpers: {helpers}"
    yield f"explained variance: {r['explained_variance']:.4f}"
    total = r["machine"]["memory_total_gib"]
    yield (
        f"peak RSS: {r['peak_rss_bytes'] / 2**30:.2f} GiB of {total} GiB RAM "
        f"({r['peak_rss_bytes'] / 2**30 / total:.0%}); the run completed"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="gradcli's batch (default: its own choice)"
    )
    parser.add_argument("--paper-batch", type=int, default=64, help="batch the paper is timed on")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--directions", type=int, default=2, help="paper directions timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--paper-full", action="store_true", help="run the jvp/vjp iteration end to end (slow)"
    )
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes (default: auto)")
    parser.add_argument("--pca200", action="store_true", help="K = 200 memory check instead")
    parser.add_argument(
        "--pca200-samples",
        type=int,
        default=None,
        help="default K + p + 1: fewer samples lower the rank of G and so the block width",
    )
    parser.add_argument("--headroom-gib", type=int, default=3, help="--pca200 spare memory")
    parser.add_argument("--force", action="store_true", help="--pca200 even if memory is short")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pca_speed_") as workdir:
        record = pca200(args, workdir) if args.pca200 else compare(args, workdir)
    lines = report_pca200(record) if args.pca200 else report_compare(record)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(record, out, indent=2)


if __name__ == "__main__":
    main()
