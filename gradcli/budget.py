"""Memory policy: parse and format sizes, the default budget, row blocks, tiles and batch sizes.

Plain numbers in, plain numbers out: nothing here touches a model, a device or the store.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

from gradcli.errors import BadInputError


def parse_size(text: str) -> int:
    """'512M', '4G', '1.5GiB', '1000000' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = cleaned[-1] if cleaned and cleaned[-1] in units else ""
    number = cleaned[: len(cleaned) - len(unit)]
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise BadInputError(
            f"--memory-budget takes a size such as 512M or 4G, not '{text}'"
        ) from None
    if value <= 0:
        raise BadInputError("--memory-budget must be positive")
    if value < 1:
        raise BadInputError(f"--memory-budget must be at least one byte, not '{text}'")
    return int(value)


def format_size(size: int) -> str:
    """Bytes as the largest unit that keeps a number of at least 1: '1.5 GiB', '512 B'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def default_memory_budget() -> int:
    """Half of the memory available now: a safe share that leaves room for everything else."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


def plan_row_blocks(
    sizes: Sequence[int],
    names: Sequence[str],
    bytes_per_row: int,
    budget: int,
    remedies: str = "use --basis-dtype bfloat16, or leave it out with --params",
) -> list[tuple[int, int]]:
    """Split parameters (in order) into row blocks whose basis rows fit ``budget`` bytes.

    Returns [(first_param, end_param)] index ranges; one block when everything fits.
    ``remedies`` completes the error for a parameter too large alone ("raise
    --memory-budget, " + remedies), naming what the calling command offers.
    """
    blocks, first, used = [], 0, 0
    for index, size in enumerate(sizes):
        need = size * bytes_per_row
        if need > budget:
            raise BadInputError(
                f"parameter {names[index]} alone needs {format_size(need)} of basis rows, "
                f"over the memory budget's {format_size(budget)}; raise --memory-budget, "
                f"{remedies}"
            )
        if used + need > budget and index > first:
            blocks.append((first, index))
            first, used = index, 0
        used += need
    blocks.append((first, len(sizes)))
    return blocks


def auto_batch_size(sample_bytes: int, budget_bytes: int, cap: int = 256) -> int:
    """The largest batch (up to ``cap``) whose working memory fits ``budget_bytes``."""
    return int(max(1, min(cap, budget_bytes // max(1, sample_bytes))))


FLOAT32_BYTES = 4  # the engine forms per-sample gradients in float32
# Shares of the memory budget, and what the stages' plans count per entry.
BASIS_SHARE = 0.6  # for basis rows (embed's parameter blocks); the rest for batches and the model
PCA_SHARE = 0.9  # for PCA's block and accumulator; batches take what is left
# PCA keeps a batch's normalised gradients (B×P float32) for its second product when the budget
# allows at least this many samples per batch (a smaller batch would cost more than it saves).
PCA_KEEP_MIN_BATCH = 32
PCA_KEEP_MAX_BATCH = 128
# The AG basis, orthonormalised from the stored class means one parameter block at a time: the
# budget's share for its C×C float64 matrices (at most AG_MATRICES alive at once: the Gram and
# its factor), the store's read buffers and one block.
AG_SHARE = 0.9
AG_MATRICES = 2
# Per parameter row of a block, per class: the float32 class means read (4), their normalised
# float64 copy (8) and its float32 copy written (4), Q's row in float64 (8) and float32 (4);
# plus per row the mean, variance and scale.
AG_BYTES_PER_CLASS = 28
AG_BYTES_PER_ROW = 32


def ag_basis_plan(
    classes: int, params: int, memory_budget: int, chunk_rows: int, read_bytes: int = 0
) -> tuple[int, int, int]:
    """The AG basis's blocks: (rows per block, rows per chunk of its outputs, fixed bytes).

    The fixed part is AG_MATRICES C×C float64 matrices and ``read_bytes`` of the store's read
    buffers; a block takes the rest of the budget's AG_SHARE. A block of at least
    ``chunk_rows`` rows (the outputs' chunk cap) is a whole number of chunks, a smaller one
    is itself the chunk, so every chunk is written whole, once. A budget without room for
    the fixed part and one row is refused, saying how much would do.
    """
    matrices = AG_MATRICES * 8 * classes * classes
    fixed = matrices + read_bytes
    row_bytes = AG_BYTES_PER_CLASS * classes + AG_BYTES_PER_ROW
    rows = (int(memory_budget * AG_SHARE) - fixed) // row_bytes
    if rows < 1:
        enough = int((fixed + row_bytes * min(params, chunk_rows)) / AG_SHARE) + 1
        raise BadInputError(
            f"--method avg orthonormalises {classes:,} class means with {AG_MATRICES} "
            f"{classes:,} x {classes:,} float64 matrices ({format_size(matrices)}) and "
            f"{format_size(read_bytes)} of read buffers, over {AG_SHARE:.0%} of the memory "
            f"budget's {format_size(memory_budget)}; raise --memory-budget to "
            f"{format_size(enough)} or more, or use --method pca --k N"
        )
    if rows >= params:
        return params, max(1, min(chunk_rows, params)), fixed
    if rows >= chunk_rows:
        return rows // chunk_rows * chunk_rows, chunk_rows, fixed
    return rows, rows, fixed


TILE_WORKSPACES = 3  # tiles alive at once: the engine's, the normalised one, its bf16 copy
SLACK_BYTES = 16 << 20  # for what no plan counts (allocator, small buffers)
TILE_BYTES = 32 << 20  # per-sample gradient workspace per tile: small enough to stay cache-warm


def tile_bytes_for(memory_budget: int) -> int:
    """Bytes of one per-sample gradient tile under ``memory_budget``: large enough for fast
    products, a small share of the budget (the engine and the projection each hold one)."""
    return int(min(TILE_BYTES, max(1 << 20, memory_budget // 16)))


def _rows_per_tile(rows: int, row_bytes: int, tile_bytes: int) -> int:
    """Output channels per tile of a per-sample product: the fewest tiles that each fit
    ``tile_bytes``, made equal. Filling tiles to the brim leaves a last tile of a few channels,
    whose product runs at a fraction of the rate (the balanced split: -8% engine time on a
    CIFAR ResNet-18)."""
    most = max(1, tile_bytes // row_bytes)
    tiles = -(-rows // most)
    return -(-rows // tiles)


def resolve_budget(value: int | str | None) -> int:
    """The memory budget in bytes from what a user gave: a size string ('8G', parsed by
    :func:`parse_size`), a positive number of bytes, or None (or an empty value) for
    :func:`default_memory_budget`."""
    if isinstance(value, str):
        value = parse_size(value)
    elif value is not None and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
    ):
        raise BadInputError(
            f"memory_budget must be a positive number of bytes or a size such as '8G', "
            f"not {value!r}"
        )
    return int(value) if value else default_memory_budget()


def tile_channels(channels: int, batch: int, fan_in: int, tile_bytes: int) -> int:
    """Output channels per tile of a layer's per-sample weight gradients, float32
    (batch, channels · fan_in): :func:`_rows_per_tile` with one channel's rows of the batch
    as the unit."""
    return _rows_per_tile(channels, FLOAT32_BYTES * batch * fan_in, tile_bytes)


def sample_working_bytes(
    captures: Sequence[tuple[int, int, int]], batch: int, fallback_rows: int = 0
) -> int:
    """The gradient engine's working memory per sample, in bytes, from one capture of
    ``batch`` samples: ``captures`` holds, per captured layer, (input elements, kernel taps
    or 1 for a layer without a kernel, output-gradient elements or 0), all float32 over the
    batch. An input counts 2 + taps times (the activation kept for the backward, the hook's
    capture, the unfolded convolution input); each of the ``fallback_rows`` parameters that
    torch.func handles costs three float32 values per sample."""
    total = sum(inputs * (2 + taps) + grad_output for inputs, taps, grad_output in captures)
    return FLOAT32_BYTES * total // batch + FLOAT32_BYTES * fallback_rows * 3


def free_for_batches(
    memory_budget: int, fixed_bytes: int, model_bytes: int, tile_bytes: int
) -> int:
    """Bytes of the budget left for batches once a stage's ``fixed_bytes``, the model (its
    parameters and their gradients) and the tile workspaces are counted."""
    workspaces = TILE_WORKSPACES * tile_bytes
    return memory_budget - fixed_bytes - 2 * model_bytes - workspaces - SLACK_BYTES


# A P × K basis beyond the budget: row ranges, passes and what they hold per row.
PCA_ROW_BYTES = 8  # per row of a PCA block pass beside its K + p float32 columns: the
# Projector's float32 shift and 1/scale
NORMALISATION_BYTES = 16  # per parameter: mean and scale (float32), and their Projector copies
# PCA's stored P-row arrays are chunked at an eighth of a block's rows, so a read or write in
# flight (a decoded chunk and its copy) costs a quarter of the block's bytes at most.
STORE_CHUNKS_PER_BLOCK = 8
START_CHUNK_ROWS = 4096  # rows per independently seeded chunk of PCA's random start


def plan_row_ranges(
    sizes: Sequence[int],
    bytes_per_row: int,
    budget: int,
    *,
    fewest: bool = False,
    what: str = "basis rows",
) -> list[tuple[int, int]]:
    """Split P = Σ sizes rows (parameters in order) into ranges [(first_row, end_row)] whose
    rows fit ``budget`` bytes at ``bytes_per_row`` each.

    ``fewest``: the fewest ranges there can be, ⌈P · bytes_per_row / budget⌉ of equal size,
    cutting parameters anywhere (one pass over the data per range). Otherwise whole
    parameters are packed in order (the ranges :func:`plan_row_blocks` gives wherever it
    succeeds), and only a parameter larger than a whole range is cut across ranges.
    """
    cap = int(budget) // max(1, int(bytes_per_row))
    if cap < 1:
        raise BadInputError(
            f"one row of {what} needs {format_size(int(bytes_per_row))}, over the memory "
            f"budget's {format_size(max(0, int(budget)))} left for them; raise --memory-budget"
        )
    total = int(sum(int(size) for size in sizes))
    if fewest:
        count = max(1, -(-total // cap))
        edges = [total * i // count for i in range(count + 1)]
        return list(zip(edges[:-1], edges[1:], strict=True))
    ranges: list[tuple[int, int]] = []
    first = row = used = 0
    for size in (int(size) for size in sizes):
        if size > cap:  # fill the open range, then whole ranges, then leave the rest open
            remaining = size
            while used + remaining > cap:
                take = cap - used
                row, remaining = row + take, remaining - take
                ranges.append((first, row))
                first, used = row, 0
            row, used = row + remaining, used + remaining
            continue
        if used + size > cap and used > 0:
            ranges.append((first, row))
            first, used = row, 0
        row, used = row + size, used + size
    if row > first or not ranges:
        ranges.append((first, row))
    return ranges


def block_passes(form: str, blocks: int, iterations: int) -> int:
    """Passes over the data of PCA's subspace iteration with ``iterations`` iterations and a
    last Rayleigh–Ritz pass: one per iteration in memory; in row blocks, ``U = G V`` once per
    block every iteration and for Rayleigh–Ritz, and ``Y = Gᵀ U`` once per block every
    iteration."""
    if form == "memory":
        return iterations + 1
    return (2 * iterations + 1) * blocks
