"""Peak memory of the average-gradient basis: the dense QR of all class means in memory (the
earlier form) against the blocked CholeskyQR2 from the store, on one synthetic statistics
store (C class means x P parameters, float32, centred so K = C - 1).

Each form runs in its own subprocess, which reports its VmHWM (peak resident set) before the
basis (imports, store open) and after it, and its wall time; the parent compares the two bases
column by column (|cos|, signs) and prints one JSON object with the machine.

    python benchmarks/ag_memory.py --classes 200 --params 1000000 --budget 64M
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def vm_hwm() -> int:
    """This process's peak resident set, bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_store(path: str, classes: int, params: int, chunk_columns: int) -> None:
    """Statistics as the statistics stage leaves them: mean, variance, class means (C, P)
    float32 written row by row into (1, chunk_columns) chunks, class counts."""
    from gradcli import layout
    from gradcli.store import RunStore

    rng = np.random.default_rng(0)
    store = RunStore(path)
    counts = rng.integers(50, 150, size=classes)
    store.create_rows(
        layout.STATS_CLASS_MEANS,
        (classes, params),
        "float32",
        chunk_rows=1,
        chunk_columns=chunk_columns,
    )
    total = np.zeros(params)
    for c in range(classes):
        row = rng.normal(size=params).astype(np.float32)
        total += counts[c] * row
        store.write_rows(layout.STATS_CLASS_MEANS, c, row[None, :])
    mean = (total / counts.sum()).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=params).astype(np.float32)
    store.write(layout.STATS_MEAN, mean, chunk_rows=layout.BASIS_CHUNK_ROWS)
    store.write(layout.STATS_VAR, var, chunk_rows=layout.BASIS_CHUNK_ROWS)
    store.set_attrs(layout.STATS, class_counts=[int(n) for n in counts])


def dense(store) -> int:
    """The earlier form: every class mean read into memory as float64, normalised, and one
    Householder QR (the basis and class means written whole)."""
    import torch

    from gradcli import layout
    from gradcli.subspace import RANK_TOLERANCE

    means = torch.from_numpy(store.read(layout.STATS_CLASS_MEANS)).double()
    mean = torch.from_numpy(store.read(layout.STATS_MEAN))
    scale = torch.from_numpy(store.read(layout.STATS_VAR)).sqrt()
    normalised = means.T - mean.double()[:, None]
    normalised /= scale.double()[:, None]
    q, r = torch.linalg.qr(normalised, mode="reduced")
    diagonal = torch.diagonal(r)
    keep = diagonal.abs() > RANK_TOLERANCE * diagonal.abs().max()
    q.mul_(torch.where(diagonal < 0, -1.0, 1.0).to(q.dtype)[None, :])
    q = q[:, keep]
    basis = q.float().numpy()
    del q
    store.write(
        layout.SUBSPACE_CLASS_MEANS, normalised.float().numpy(), chunk_rows=layout.BASIS_CHUNK_ROWS
    )
    store.write(layout.BASIS, basis, chunk_rows=layout.BASIS_CHUNK_ROWS)
    return basis.shape[1]


def child(form: str, path: str, classes: int, params: int, budget: int) -> None:
    """Run one form and print {form, k, seconds, baseline_bytes, peak_bytes} as JSON."""
    import torch

    from gradcli import layout
    from gradcli.progress import NullProgress
    from gradcli.stages import ag_basis
    from gradcli.store import RunStore

    store = RunStore(path)
    # Warm up what any form touches first (zarr's codecs and threads, LAPACK), so the
    # baseline holds the libraries and the peak above it is the basis's own memory.
    store.read_rows(layout.STATS_MEAN, 0, 1)
    store.read_columns(layout.STATS_CLASS_MEANS, 0, 1)
    torch.linalg.qr(torch.randn(64, 8, dtype=torch.float64))
    baseline = vm_hwm()
    start = time.perf_counter()
    if form == "dense":
        k = dense(store)
        plan = None
    else:
        plan = ag_basis.ag_plan(budget, classes, params)
        k = ag_basis.write_average_gradient_basis(store, plan, False, NullProgress())
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "form": form,
                "k": k,
                "seconds": round(seconds, 1),
                "baseline_bytes": baseline,
                "peak_bytes": vm_hwm(),
                "blocks": plan.blocks if plan else 1,
                "block_rows": plan.block_rows if plan else params,
            }
        )
    )


def compare(path: str, saved: np.ndarray) -> dict:
    """Smallest cos of matching columns between the stored basis and ``saved``."""
    from gradcli import layout
    from gradcli.store import RunStore

    store = RunStore(path)
    params = store.shape(layout.BASIS)[0]
    dots = np.zeros(saved.shape[1])
    norms_a = np.zeros(saved.shape[1])
    norms_b = np.zeros(saved.shape[1])
    for start in range(0, params, 1 << 17):
        a = store.read_rows(layout.BASIS, start, start + (1 << 17)).astype(np.float64)
        b = saved[start : start + (1 << 17)].astype(np.float64)
        dots += (a * b).sum(0)
        norms_a += (a * a).sum(0)
        norms_b += (b * b).sum(0)
    cos = dots / np.sqrt(norms_a * norms_b)
    return {"min_cos": float(cos.min()), "signs_equal": bool((cos > 0).all())}


def main() -> None:
    from gradcli.budget import format_size, parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--budget", default="64M")
    parser.add_argument("--chunk-columns", type=int, default=1 << 20)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = parse_size(args.budget)
    if args.child:
        child(args.child[0], args.child[1], args.classes, args.params, budget)
        return
    from machine import machine_info

    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "store")
        make_store(path, args.classes, args.params, args.chunk_columns)
        results = {}
        saved = None
        for form in ("blocked", "dense"):
            command = [sys.executable, __file__, "--classes", str(args.classes)]
            command += ["--params", str(args.params), "--budget", args.budget]
            command += ["--child", form, path]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[form] = json.loads(out.strip().splitlines()[-1])
            for key in ("baseline_bytes", "peak_bytes"):
                results[form][key.replace("bytes", "size")] = format_size(results[form][key])
            above = results[form]["peak_bytes"] - results[form]["baseline_bytes"]
            results[form]["above_baseline"] = format_size(above)
            if form == "blocked":
                from gradcli import layout
                from gradcli.store import RunStore

                saved = RunStore(path).read(layout.BASIS)
        results["agreement"] = compare(path, saved)
    results["classes"], results["params"], results["budget"] = (
        args.classes,
        args.params,
        args.budget,
    )
    results["machine"] = machine_info()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
