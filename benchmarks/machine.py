"""What machine a benchmark ran on, so that every figure it prints can name its hardware."""

from __future__ import annotations

import os
import platform

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (e.g. 'AMD EPYC 9R14 96-Core Processor')."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def meminfo_bytes(field: str) -> int:
    """A /proc/meminfo field in bytes (0 when unreadable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_info(device: torch.device | str = "cpu") -> dict:
    """CPU model, the cores this process may use, torch threads, memory, load, library
    versions and, on CUDA, the GPU's name."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": round(meminfo_bytes("MemTotal") / 2**30, 1),
        "memory_available_gib": round(meminfo_bytes("MemAvailable") / 2**30, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict) -> str:
    """One line naming the hardware and software of :func:`machine_info`."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info['memory_total_gib']} GiB RAM{gpu}; torch {info['torch']}, "
        f"numpy {info['numpy']}, Python {info['python']}"
    )
