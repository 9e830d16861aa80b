"""Embed throughput of one process against N concurrent shard processes on one store.

On CIFAR ResNet-18 (seeded random weights) with an AG subspace (K = 9) made from a few random
images, it embeds the same random 32×32 images twice, from copies of one store:

(1) one process using every core (``OMP_NUM_THREADS`` = cores, torch's intra-op threads);
(2) N processes started at once with ``embed --shard I/N``, each with cores/N threads;

and prints images/s of each (whole-command wall time, process start and model load
included, as an array job pays them), the ratio (2)/(1), whether both stores hold bitwise
equal arrays, and the machine.

Run from the repository root (about a minute on 2 cores)::

    python benchmarks/scale.py [--images 256] [--shards 2] [--json scale.json]
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradcli.store import RunStore  # noqa: E402

from machine import describe, machine_info  # noqa: E402

KEYS = ("grad", "gnorm", "feat", "logits", "labels")


def gradcli(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, "-m", "gradcli", *args, "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"gradcli failed: {err.decode()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.images < 1 or args.shards < 1 or args.batch_size < 1:
        parser.error("--images, --shards and --batch-size must be positive")
    info = machine_info()
    cores = info["cores"]
    threads_each = max(1, cores // args.shards)
    with tempfile.TemporaryDirectory(prefix="gradcli-scale-") as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 255, size=(args.images, 32, 32, 3), dtype=np.uint8)
        np.savez(work / "data.npz", x=x, y=np.arange(args.images) % 10)
        train = rng.integers(0, 255, size=(20, 32, 32, 3), dtype=np.uint8)
        np.savez(work / "train.npz", x=train, y=np.arange(20) % 10)  # two of each class
        data = f"npz:{work / 'data.npz'}"
        base = work / "base"
        extract = ["extract-subspace", "--model", "cifar_resnet18"]
        extract += ["--dataset", f"npz:{work / 'train.npz'}", "--store", str(base)]
        from gradcli.models import load_model

        torch.manual_seed(0)  # one weights file: every process must use the same weights
        torch.save(load_model("cifar_resnet18").module.state_dict(), work / "r18.pt")
        extract += ["--weights", str(work / "r18.pt")]
        wait_all([gradcli(extract, cores)])
        embed = ["embed", "--dataset", data, "--name", "x", "--chunk-rows", "32"]
        embed += ["--batch-size", str(args.batch_size)]
        timings = {}
        for label, count, threads in (
            ("1 process", 1, cores),
            (f"{args.shards} shard processes", args.shards, threads_each),
        ):
            store = work / label.replace(" ", "-")
            shutil.copytree(base, store)
            shards = [[]] if count == 1 else [["--shard", f"{i}/{count}"] for i in range(count)]
            start = time.perf_counter()
            wait_all([gradcli([*embed, "--store", str(store), *s], threads) for s in shards])
            seconds = time.perf_counter() - start
            timings[label] = {
                "processes": count,
                "threads_each": threads,
                "seconds": seconds,
                "images_per_s": args.images / seconds,
                "store": store,
            }
        one, many = timings.values()
        a, b = RunStore(str(one.pop("store"))), RunStore(str(many.pop("store")))
        equal = all(
            np.array_equal(a.read(f"embed/x/{k}"), b.read(f"embed/x/{k}")) for k in KEYS
        ) and b.stage_complete("embed/x")
    result = {
        "images": args.images,
        "model": "cifar_resnet18 (seeded random weights), AG K=9",
        "timings": timings,
        "ratio": many["images_per_s"] / one["images_per_s"],
        "bitwise_equal": equal,
        "machine": info,
    }
    for label, t in timings.items():
        print(
            f"{label:>20}: {t['images_per_s']:6.1f} images/s ({t['seconds']:.1f} s, "
            f"{t['processes']} x {t['threads_each']} threads)"
        )
    print(f"ratio shards / one process: {result['ratio']:.2f}; arrays bitwise equal: {equal}")
    print(f"machine: {describe(info)}; load average at start {info['load_average'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
