"""Peak memory of the AG statistics pass (``compute_statistics`` with class means) on a
1000-class model of about 300k parameters, in a fresh process.

It reports the process's resident set before the pass and its peak (VmHWM of
/proc/self/status) after, so ``peak - before`` is what the pass added. Run it against another
checkout of gradcli (``--gradcli PATH``) to compare versions on one machine::

    python benchmarks/stats_memory.py [--classes 1000] [--per-class 4] [--batch-size 64]
        [--gradcli PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = """from torch import nn
def make():
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(5),
        nn.Flatten(), nn.Linear(300, {classes}))
"""


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def child(classes: int, per_class: int, batch: int) -> dict:
    """Run the pass in this process; return sizes in MiB and seconds."""
    import numpy as np
    import torch

    import gradcli
    from gradcli.grads import select_parameters
    from gradcli.run import Run
    from gradcli.stages import stats as stats_stage

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    (folder / "model.py").write_text(MODEL.format(classes=classes))
    rng = np.random.default_rng(0)
    n = classes * per_class
    x = rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8)
    np.savez(folder / "d.npz", x=x, y=rng.permutation(np.arange(n) % classes))
    run = Run(folder / "store", memory_budget="16G")
    run.set_model(f"{folder / 'model.py'}:make", input_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    source = run.resolve(f"npz:{folder / 'd.npz'}", default_split="train")
    selection = select_parameters(run.model.module, None)
    indices = np.arange(n)
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    stats_stage.compute_statistics(run, source, indices, selection, batch, class_sums=True)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "classes": classes,
        "parameters": selection.size,
        "samples": n,
        "batch_size": batch,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "added_mib": (peak - before) / 1024,
        "class_means_mib": classes * selection.size * 4 / 2**20,
        "seconds": seconds,
        "gradcli_file": gradcli.__file__,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gradcli", default=str(ROOT), help="checkout whose gradcli to measure")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.classes, args.per_class, args.batch_size)
        print(json.dumps(result))
        return result
    env = {**os.environ, "PYTHONPATH": args.gradcli, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", "--classes", str(args.classes)]
    command += ["--per-class", str(args.per_class), "--batch-size", str(args.batch_size)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["gradcli"] = args.gradcli
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
