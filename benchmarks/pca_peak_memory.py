"""Peak resident memory of extract-subspace (PCA) and embed under a memory budget.

Each stage runs in a child process on a randomly initialised torchvision ResNet-18 (1000
classes) over a few synthetic 32×32 images; the child reports its peak resident size (VmHWM),
its resident size once the model is loaded, and the stage's plan.

    python benchmarks/pca_peak_memory.py --budget 512MiB --k 1000 [--params 'layer4.1.*']
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import torch
from gradcli.run import Run

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

store, budget, data, stage, k, params, iterations = sys.argv[1:8]
torch.set_num_threads(2)
run = Run(store, memory_budget=budget)
notes = []
run.progress.note = notes.append
if stage == "extract":
    run.set_model("resnet18", random_weights=True, num_classes=1000, input_size=32)
else:
    run.model
loaded = status("VmRSS")
phases = {}
from gradcli.stages import pca as pca_stage  # noqa: E402

whole_pca = pca_stage.pca


def measured_pca(*args, **kwargs):
    # the statistics pass's peak, then the peak of PCA alone
    phases["before_pca"] = status("VmHWM")
    phases["at_pca_start"] = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return whole_pca(*args, **kwargs)


pca_stage.pca = measured_pca
model_bytes = sum(p.numel() * p.element_size() for p in run.model.module.parameters())
began = time.perf_counter()
error = None
try:
    if stage == "extract":
        result = run.extract_subspace(
            data, method="pca", k=int(k), params=params.split(",") if params else None,
            iterations=int(iterations), batch_size=4, iteration_dtype="float32",
        )
    else:
        result = {"name": run.embed(data, name="peak", batch_size=4)}
except Exception as exc:  # reported, not raised: the measurement is the point
    error = f"{type(exc).__name__}: {exc}"[:300]
    result = None
plan = None
for path in ("subspace", "embed/peak"):
    if run.store.has(path):
        plan = run.store.group_attrs(path).get("plan", plan)
print(json.dumps({"stage": stage, "peak": status("VmHWM"), "loaded": loaded, **phases,
                  "model_bytes": model_bytes, "seconds": time.perf_counter() - began,
                  "error": error, "plan": plan, "notes": notes[-3:],
                  "result_plan": (result or {}).get("plan")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", default="512MiB")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--params", default="")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--images", type=int, default=1100)
    parser.add_argument("--stages", default="extract,embed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        data = Path(folder) / "train.npz"
        n = args.images
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        np.savez(data, x=x, y=rng.integers(0, 1000, size=n))
        for stage in args.stages.split(","):
            command = [
                sys.executable,
                "-c",
                CHILD,
                f"{folder}/store",
                args.budget,
                f"npz:{data}",
                stage,
                str(args.k),
                args.params,
                str(args.iterations),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            if not line.startswith("{"):
                print(json.dumps({"stage": stage, "failed": done.stderr[-600:]}))
                continue
            report = json.loads(line)
            keys = ("peak", "loaded", "model_bytes", "before_pca", "at_pca_start")
            mib = {key: round(report[key] / 2**20) for key in keys if key in report}
            print(json.dumps({**report, **{f"{k}_mib": v for k, v in mib.items()}}))


if __name__ == "__main__":
    main()
