"""Shards and process groups: what lets one run span many processes and machines.

Two engines users already run do the scheduling; gradcli only does the arithmetic:

- array jobs of a batch system (SLURM, or any launcher that hands out an index and a count):
  ``embed --shard I/N`` computes the chunk-aligned row range :func:`shard_range` of its
  index, every shard writing disjoint chunks of one store;
- ``torchrun`` for the reductions of ``extract-subspace``: :class:`ProcessGroup` wraps
  ``torch.distributed`` (gloo on CPU, nccl on CUDA); every rank takes a slice of the data and
  the sums are all-reduced, rank 0 alone writes to the store.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch

from gradcli.errors import BadInputError

T = TypeVar("T")

SLURM_ENV = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
TIMEOUT_ENV = "GRADCLI_DIST_TIMEOUT"  # seconds a rank waits for the others (default 1800)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; anything else is a one-line error."""
    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        index = count = None
    if index is None or count is None:
        raise BadInputError(f"--shard takes I/N (e.g. 0/4), not '{text}'")
    return check_shard(index, count, "--shard")


def check_shard(index: int, count: int, source: str) -> tuple[int, int]:
    """``(index, count)`` of a shard, or a one-line error naming ``source`` (the option)."""
    if count < 1:
        raise BadInputError(f"{source}: the shard count N must be at least 1, got {count}")
    if not 0 <= index < count:
        raise BadInputError(
            f"{source}: shard index {index} is outside 0..{count - 1}; shards are numbered "
            f"from 0 (SLURM: --array=0-{count - 1})"
        )
    return index, count


def shard_from_env(spec: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(I, N) from environment variables: ``spec`` is ``"ID_VAR,COUNT_VAR"``, or empty for
    SLURM's ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT``."""
    env = os.environ if env is None else env
    names = SLURM_ENV
    if spec:
        names = tuple(n.strip() for n in spec.split(","))
        if len(names) != 2 or not all(names):
            raise BadInputError(
                f"--shard-from-env takes two variable names ID,COUNT (e.g. MY_ID,MY_COUNT), "
                f"not '{spec}'"
            )
    values = []
    for name in names:
        if name not in env:
            raise BadInputError(
                f"--shard-from-env: environment variable {name} is not set; run inside an "
                "array job or name the variables as --shard-from-env ID_VAR,COUNT_VAR"
            )
        try:
            values.append(int(env[name]))
        except ValueError:
            raise BadInputError(
                f"--shard-from-env: {name}='{env[name]}' is not an integer"
            ) from None
    return check_shard(values[0], values[1], f"--shard-from-env {names[0]},{names[1]}")


def torchrun_shard(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when started by torchrun with more than one process, else None:
    ``embed`` and ``score`` under torchrun shard by rank instead of all doing everything."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in env:
        return None
    return check_shard(int(env["RANK"]), world, "torchrun's RANK/WORLD_SIZE")


def shard_range(n_chunks: int, index: int, count: int) -> range:
    """Chunks of shard ``index`` of ``count``: contiguous, sizes differing by at most one."""
    return range(index * n_chunks // count, (index + 1) * n_chunks // count)


class ProcessGroup:
    """The ranks of one ``torchrun`` job, or a single process (``world == 1``).

    All collectives are no-ops for a single process, so code written against this class runs
    unchanged with and without torchrun. Sums are taken in the tensor's own dtype.
    """

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None) -> None:
        self.rank = rank
        self.world = world
        self.device = device or torch.device("cpu")

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes to the run store."""
        return self.rank == 0

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # nccl reduces CUDA tensors only; gloo takes CPU tensors.
        return tensor.to(self.device) if self.device.type == "cuda" else tensor.cpu()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) ``tensor`` over all ranks, in place; returns it."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        work = self._on_device(tensor)
        dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        work = self._on_device(tensor)
        dist.broadcast(work, src=0)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast_object(self, value: T) -> T:
        """Rank 0's picklable ``value`` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (a stop request, an error)."""
        if not self.active:
            return flag
        return bool(self.all_reduce_(torch.tensor([float(flag)]), op="max").item())

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def split(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of ``indices`` (sizes differ by at most one)."""
        if not self.active:
            return indices
        return np.array_split(indices, self.world)[self.rank]

    def steps(self, n: int, batch: int) -> int:
        """Batches of the longest rank slice of ``n`` rows: the steps every rank takes so
        their collectives pair up (a rank with a shorter slice idles through its last)."""
        longest = -(-n // self.world)
        return -(-longest // batch)

    def close(self) -> None:
        """Leave the process group (nothing to leave in one process)."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def parse_device(device: str | torch.device) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, checked; anything else is a one-line error."""
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        torch_device = None
    if torch_device is None or torch_device.type not in ("cpu", "cuda"):
        raise BadInputError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {device} requested but CUDA is not available; use cpu")
    return torch_device


def from_env(device: torch.device | str = "cpu") -> ProcessGroup:
    """The process group torchrun describes in ``WORLD_SIZE``/``RANK`` (initialised here, gloo
    on CPU, nccl on CUDA), or a single process when those are absent or ``WORLD_SIZE`` is 1.

    On CUDA each rank uses ``cuda:LOCAL_RANK``.
    """
    device = parse_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return ProcessGroup(0, 1, device)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = _dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    return ProcessGroup(rank, world, device)
