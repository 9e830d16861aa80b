"""The memory policy: sizes, the budget, tiles, row blocks and batch sizes, against closed forms."""

from __future__ import annotations

import pytest

from gradcli import budget as budget_mod
from gradcli.budget import (
    AG_BYTES_PER_CLASS,
    AG_BYTES_PER_ROW,
    AG_MATRICES,
    AG_SHARE,
    TILE_BYTES,
    _rows_per_tile,
    ag_basis_plan,
    auto_batch_size,
    format_size,
    parse_size,
    plan_row_blocks,
    resolve_budget,
    sample_working_bytes,
    tile_bytes_for,
    tile_channels,
)
from gradcli.errors import BadInputError


def test_tiles_are_the_fewest_that_fit_and_nearly_equal():
    for rows in (1, 5, 64, 113, 128, 512, 1000):
        for row_bytes in (1, 3, 1 << 10):
            for tile_bytes in (1, 7, 1 << 12, 1 << 16, 1 << 20):
                step = _rows_per_tile(rows, row_bytes, tile_bytes)
                tiles = [min(step, rows - start) for start in range(0, rows, step)]
                fits = max(1, tile_bytes // row_bytes)  # rows one tile may hold
                fewest = next(n for n in range(1, rows + 1) if -(-rows // n) <= fits)
                assert step <= fits and len(tiles) == fewest
                assert max(tiles) - min(tiles) <= len(tiles)


def test_row_block_plan_respects_the_budget():
    sizes, names = [100, 50, 300, 20, 20], ["a", "b", "c", "d", "e"]
    blocks = plan_row_blocks(sizes, names, bytes_per_row=4, budget=1300)
    assert blocks == [(0, 2), (2, 4), (4, 5)]  # greedy: 400+200 | 1200+80 | 80 bytes
    with pytest.raises(BadInputError, match="parameter c alone"):
        plan_row_blocks(sizes, names, bytes_per_row=4, budget=1000)
    assert plan_row_blocks(sizes, names, bytes_per_row=4, budget=10**6) == [(0, 5)]


def test_format_size_and_a_budget_too_small_for_one_parameter():
    sizes = [512, 1536, 5 << 20, 3 << 30]
    assert [format_size(n) for n in sizes] == ["512 B", "1.5 KiB", "5 MiB", "3 GiB"]
    message = "needs 4 KiB of basis rows, over the memory budget's 1000 B"
    with pytest.raises(BadInputError, match=message):
        plan_row_blocks([1024], ["w"], bytes_per_row=4, budget=1000)


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1000") == 1000
    with pytest.raises(BadInputError, match="--memory-budget"):
        parse_size("lots")


def test_resolve_budget_parses_once_and_defaults(monkeypatch):
    monkeypatch.setattr(budget_mod, "default_memory_budget", lambda: 123_456_789)
    assert resolve_budget(None) == 123_456_789
    assert resolve_budget("8G") == 8 * 2**30
    assert resolve_budget("1.5GiB") == int(1.5 * 2**30)
    assert resolve_budget(" 20k ") == 20 * 2**10
    assert resolve_budget(4096) == 4096
    with pytest.raises(
        BadInputError, match=r"^--memory-budget takes a size such as 512M or 4G, not 'lots'$"
    ):
        resolve_budget("lots")
    with pytest.raises(BadInputError, match=r"^--memory-budget must be positive$"):
        resolve_budget("-1G")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(
            BadInputError, match=r"^memory_budget must be a positive number of bytes"
        ):
            resolve_budget(bad)


def test_auto_batch_size_is_the_largest_that_fits():
    for sample_bytes in (1, 7, 1000, 10**9):
        for budget in (0, 1, 999, 10**6, 10**12):
            for cap in (1, 16, 256):
                size = auto_batch_size(sample_bytes, budget, cap=cap)
                fits = [n for n in range(1, cap + 1) if n * sample_bytes <= budget]
                assert size == (max(fits) if fits else 1)


def test_an_empty_or_sub_byte_size_is_a_one_line_error():
    from gradcli.budget import parse_size, resolve_budget

    with pytest.raises(BadInputError, match="takes a size such as 512M"):
        parse_size("")
    with pytest.raises(BadInputError, match="takes a size such as 512M"):
        resolve_budget("  ")
    with pytest.raises(BadInputError, match="at least one byte, not '0.5'"):
        resolve_budget("0.5")


def test_tile_bytes_are_a_sixteenth_of_the_budget_between_one_mib_and_the_cap():
    assert TILE_BYTES == 32 * 2**20
    assert tile_bytes_for(2**30) == 32 * 2**20  # a sixteenth (64 MiB) is over the cap
    assert tile_bytes_for(160 * 2**20) == 10 * 2**20
    assert tile_bytes_for(3 * 2**20) == 2**20  # a sixteenth is under the 1 MiB floor
    assert tile_bytes_for(1) == 2**20


def test_tile_channels_are_the_fewest_float32_tiles_that_fit():
    for channels in (1, 7, 64, 513):
        for batch in (1, 3, 32):
            for fan_in in (1, 9, 576):
                for tile_bytes in (1, 4096, 1 << 20):
                    step = tile_channels(channels, batch, fan_in, tile_bytes)
                    channel_bytes = 4 * batch * fan_in  # one channel's float32 rows of a batch
                    fits = max(1, tile_bytes // channel_bytes)
                    fewest = -(-channels // fits)
                    assert step <= fits
                    assert len(range(0, channels, step)) == fewest


def test_sample_working_bytes_closed_form():
    # A 3x3 convolution: input 2 x 3x8x8, output gradient 2 x 6x8x8; a linear layer: input
    # 2 x 24, output gradient 2 x 5; 10 parameters through torch.func.
    conv = 2 * 192 * (2 + 9) + 2 * 384
    linear = 2 * 24 * (2 + 1) + 2 * 5
    want = 4 * (conv + linear) // 2 + 4 * 10 * 3
    captures = [(2 * 192, 9, 2 * 384), (2 * 24, 1, 2 * 5)]
    assert sample_working_bytes(captures, 2, 10) == want
    assert sample_working_bytes(captures, 2) == want - 120
    assert sample_working_bytes([(7, 1, 0)], 3) == 4 * 21 // 3  # no output gradient, rounded down


def test_ag_basis_plan_fills_its_share_with_whole_chunks():
    """Blocks hold the most rows that fit beside the C×C matrices and read buffers, as whole
    output chunks (or one chunk, when fewer than a chunk fit); one block when all fits."""
    cap = 64
    for classes in (3, 10, 200):
        row = AG_BYTES_PER_CLASS * classes + AG_BYTES_PER_ROW
        for read_bytes in (0, 5000):
            fixed = AG_MATRICES * 8 * classes * classes + read_bytes
            for params in (1, 50, 999, 100_000):
                for budget in (2_000, 30_000, 500_000, 3_000_000, 50 << 20):
                    share = int(budget * AG_SHARE)
                    if share - fixed < row:
                        with pytest.raises(BadInputError, match="--method avg orthonormalises"):
                            ag_basis_plan(classes, params, budget, cap, read_bytes)
                        continue
                    block, chunk, planned = ag_basis_plan(classes, params, budget, cap, read_bytes)
                    assert planned == fixed and fixed + block * row <= share
                    assert 1 <= chunk <= cap and (block == params or block % chunk == 0)
                    if block < params:  # nothing larger of the same form fits
                        assert fixed + (block + (cap if block >= cap else 1)) * row > share


def test_ag_basis_plan_refusal_names_a_budget_that_works():
    classes, params, cap, read_bytes = 1000, 25_557_032, 8192, 32 << 20
    matrices = AG_MATRICES * 8 * classes**2  # 16 MB of C×C matrices
    row = AG_BYTES_PER_CLASS * classes + AG_BYTES_PER_ROW
    enough = int((matrices + read_bytes + row * cap) / AG_SHARE) + 1
    with pytest.raises(BadInputError) as refused:
        ag_basis_plan(classes, params, 40 << 20, cap, read_bytes)
    assert str(refused.value) == (
        f"--method avg orthonormalises 1,000 class means with {AG_MATRICES} 1,000 x 1,000 "
        f"float64 matrices ({format_size(matrices)}) and 32 MiB of read buffers, over "
        f"{AG_SHARE:.0%} of the memory budget's 40 MiB; raise --memory-budget to "
        f"{format_size(enough)} or more, or use --method pca --k N"
    )
    block, chunk, _ = ag_basis_plan(classes, params, enough, cap, read_bytes)
    assert (block, chunk) == (cap, cap)
