"""PCA in row blocks, for a P×(K+p) block beyond the memory budget: ``U = G V`` and
``Y = Gᵀ U`` are formed one block of parameter rows at a time (one data pass per block), with
V, Y and U kept in the store, so memory is bounded by a block while the result is the same
iteration.
"""

from __future__ import annotations

import torch

from gradcli import layout
from gradcli.errors import BadInputError
from gradcli.grads import (
    LayerGradients,
    Projector,
)
from gradcli.stages.checks import check_finite
from gradcli.stages.context import RunContext
from gradcli.stages.passes import data_pass
from gradcli.stages.pca_plan import PcaJob, PcaPlan, start_rows
from gradcli.store import MAX_CHUNK_BYTES
from gradcli.subspace import (
    Subspace,
    gram_,
    inverse_factor,
    ritz_rotation,
)


def pca_blocked(run: RunContext, job: PcaJob, plan: PcaPlan) -> Subspace:
    """Subspace iteration when the P×(K+p) block and accumulator exceed the budget.

    V and Y live in the store; the parameters are split into the plan's row blocks (a
    block may cut a parameter), and one iteration is two passes over the data per block
    (``U = Σ_b G_b V_b``, then ``Y_b = G_bᵀ U``) and a CholeskyQR2 read and written piece by
    piece. Every phase reads arrays it does not write (two P×w slots, S0 and S1, swap
    roles), and progress is saved after each block pass, so a killed run redoes at most one
    block pass. Memory: the largest block's rows, U, and the plan's fixed bytes.
    """
    source, indices, selection = job.source, job.indices, job.selection
    mean, scale, k, width = job.mean, job.scale, job.k, job.width
    iterations, seed, batch_size = job.iterations, job.seed, job.batch_size
    p, n = selection.size, len(indices)
    blocks = list(plan.blocks)
    piece = max(1, max(b - a for a, b, _ in blocks) // 2)  # rows read beside their product
    chunk = plan.chunk_rows
    state = layout.SUBSPACE_STATE
    attrs = run.store.group_attrs(state) if run.store.has(state) else {}
    model = run.model
    tile_bytes = run._tile_bytes()
    engines = [
        LayerGradients(model.module, selection, only=names, rows=(a, b), tile_bytes=tile_bytes)
        for a, b, names in blocks
    ]
    bounds = [a for a, _, _ in blocks] + [p]
    form = {"form": "blocks", "width": width, "bounds": bounds, "start": "chunked"}
    if any(attrs.get(key) != value for key, value in form.items()):
        run.store.delete(state)
        for slot in ("S0", "S1"):
            run.store.create_rows(
                f"{state}/{slot}",
                (p, width),
                "float32",
                chunk_rows=chunk,
                compress=False,
            )
        for a, b in _pieces(p, piece):  # the seeded Gaussian start, orthonormalised below
            write_rows(run, f"{state}/S1", a, start_rows(seed, a, b, width), chunk)
        batch = batch_size or min(
            run._batch_size(engine, source, indices, plan.fixed_bytes) for engine in engines
        )
        for engine in engines:
            engine.release()
        attrs = dict(form, iteration=0, phase="orth1", starting=True, v=0, block=0, uslot=0)
        attrs["batch"] = batch
        run.store.set_attrs(state, **attrs)
    batch = attrs["batch"]
    n_batches = -(-n // batch)
    per_iteration = 2 * len(blocks) * n_batches
    with run.progress.task("PCA (row blocks)", total=(iterations + 1) * per_iteration) as (advance):
        done_in_iteration = {
            "u": attrs["block"],
            "y": len(blocks) + attrs["block"],
        }.get(attrs["phase"], 0 if attrs["starting"] else 2 * len(blocks))
        advance(attrs["iteration"] * per_iteration + done_in_iteration * n_batches)
        while True:
            attrs = run.store.group_attrs(state)
            phase, v = attrs["phase"], attrs["v"]
            if phase in ("orth1", "orth2"):
                first = phase == "orth1"
                source_slot, target_slot = (1 - v, v) if first else (v, 1 - v)
                _orthonormalise_rows(
                    run,
                    f"{state}/S{source_slot}",
                    f"{state}/S{target_slot}",
                    (p, piece, chunk),
                    first,
                )
                if first:
                    run.store.set_attrs(state, phase="orth2")
                else:
                    iteration = attrs["iteration"] + (0 if attrs["starting"] else 1)
                    run.store.set_attrs(
                        state, phase="u", v=1 - v, iteration=iteration, starting=False, block=0
                    )
                continue
            if phase == "u":
                u = _pca_blocked_u(
                    run,
                    state,
                    attrs,
                    blocks,
                    engines,
                    mean,
                    scale,
                    source,
                    indices,
                    batch,
                    width,
                    chunk,
                    advance,
                )
                if attrs["iteration"] == iterations:
                    return _pca_blocked_ritz(run, state, attrs, (p, piece, chunk), u, k, n)
                run.store.set_attrs(state, phase="y", block=0)
                continue
            _pca_blocked_y(
                run,
                state,
                attrs,
                blocks,
                engines,
                mean,
                scale,
                source,
                indices,
                batch,
                width,
                chunk,
                advance,
            )
            run.store.set_attrs(state, phase="orth1")


def _blocked_pass(run: RunContext, engine, source, indices, batch, each) -> None:
    """One pass over the data for one row block: ``each(rows, start, tile)`` per tile."""
    for step in data_pass(
        run,
        source,
        indices,
        batch,
        engine=engine,
        stop_message="stopped during a PCA block pass; rerun the same command to resume at "
        "the start of that block",
    ):
        for start, tile in engine.tiles():
            each(step.rows, start, tile)


def _pca_blocked_u(
    run: RunContext,
    state,
    attrs,
    blocks,
    engines,
    mean,
    scale,
    source,
    indices,
    batch,
    width,
    chunk,
    advance,
) -> torch.Tensor:
    """``U = Σ_b G_b V_b`` (n, w) float64, saved after every block."""
    n, v, uslot = len(indices), attrs["v"], attrs["uslot"]
    if attrs["block"]:
        u = torch.from_numpy(run.store.read(f"{state}/U{uslot}")).to(run.device)
    else:
        u = torch.zeros(n, width, dtype=torch.float64, device=run.device)
    unused = torch.zeros(n, dtype=torch.float64, device=run.device)
    n_batches = -(-n // batch)
    for b in range(attrs["block"], len(blocks)):
        start, stop, _ = blocks[b]
        rows_v = read_rows(run, f"{state}/S{v}", start, stop, chunk)
        projector = Projector(
            mean[start:stop], scale[start:stop], rows_v, start=start, device=run.device
        )

        def add(rows, first, tile, projector=projector):
            projector.add(first, tile, u[rows], unused[rows])

        _blocked_pass(run, engines[b], source, indices, batch, add)
        engines[b].release()
        check_finite(u, "gradients", source.spec)
        uslot = 1 - uslot
        run.store.write(f"{state}/U{uslot}", u.cpu().numpy(), compress=False)
        run.store.set_attrs(state, uslot=uslot, block=b + 1)
        advance(n_batches)
    return u


def _pca_blocked_y(
    run: RunContext,
    state,
    attrs,
    blocks,
    engines,
    mean,
    scale,
    source,
    indices,
    batch,
    width,
    chunk,
    advance,
) -> None:
    """``Y_b = G_bᵀ U`` for every block, written to the slot V does not hold."""
    n_batches = -(-len(indices) // batch)
    u32 = torch.from_numpy(run.store.read(f"{state}/U{attrs['uslot']}")).float()
    u32 = u32.to(run.device)
    for b in range(attrs["block"], len(blocks)):
        start, stop, _ = blocks[b]
        y = torch.zeros(stop - start, width, device=run.device)
        projector = Projector(
            mean[start:stop],
            scale[start:stop],
            torch.zeros(stop - start, 0),
            start=start,
            device=run.device,
        )

        def accumulate(rows, first, tile, projector=projector, y=y, start=start):
            local = slice(first - start, first - start + tile.shape[1])
            y[local].addmm_(projector.normalise(first, tile).T, u32[rows])

        _blocked_pass(run, engines[b], source, indices, batch, accumulate)
        engines[b].release()
        write_rows(run, f"{state}/S{1 - attrs['v']}", start, y.cpu(), chunk)
        del y
        run.store.set_attrs(state, block=b + 1)
        advance(n_batches)


def _pieces(p: int, rows: int) -> list[tuple[int, int]]:
    """[(first, end)] pieces of at most ``rows`` rows covering [0, p)."""
    return [(a, min(a + rows, p)) for a in range(0, p, rows)]


def _store_rows(width: int, itemsize: int, chunk_rows: int) -> int:
    """Rows per store chunk of a (P, width) array created with ``chunk_rows`` (as the store
    chunks it): reads and writes go one chunk at a time, so one decoded chunk is in flight."""
    return max(1, min(chunk_rows, MAX_CHUNK_BYTES // max(1, width * itemsize)))


def read_rows(run: RunContext, path: str, start: int, stop: int, chunk_rows: int) -> torch.Tensor:
    """Rows [start, stop) of a stored (P, w) float32 array, read chunk by chunk."""
    width = run.store.shape(path)[1]
    out = torch.empty(max(0, stop - start), width)
    step = _store_rows(width, 4, chunk_rows)
    first = start
    while first < stop:
        last = min(stop, (first // step + 1) * step)
        out[first - start : last - start] = torch.from_numpy(run.store.read_rows(path, first, last))
        first = last
    return out


def write_rows(run: RunContext, path: str, start: int, rows: torch.Tensor, chunk_rows: int) -> None:
    """Write ``rows`` (r, w) at row ``start`` of a stored array, chunk by chunk."""
    step = _store_rows(rows.shape[1], rows.element_size(), chunk_rows)
    first, stop = start, start + rows.shape[0]
    while first < stop:
        last = min(stop, (first // step + 1) * step)
        run.store.write_rows(path, first, rows[first - start : last - start].numpy())
        first = last


def write_whole(run: RunContext, path: str, array: torch.Tensor, chunk_rows: int) -> None:
    """Write a (P, w) checkpoint array (replacing one), uncompressed, chunk by chunk."""
    dtype = str(array.dtype).removeprefix("torch.")
    run.store.create_rows(path, tuple(array.shape), dtype, chunk_rows=chunk_rows, compress=False)
    write_rows(run, path, 0, array, chunk_rows)


def _orthonormalise_rows(
    run: RunContext, source: str, target: str, sizes: tuple[int, int, int], first: bool
) -> None:
    """One CholeskyQR round over a stored (P, w) array, piece by piece: target = source R⁻¹.
    ``sizes``: (P, rows per piece, the arrays' chunk rows)."""
    p, piece, chunk = sizes
    width = run.store.shape(source)[1]
    gram = torch.zeros(width, width, dtype=torch.float64)
    for start, stop in _pieces(p, piece):
        gram_(gram, read_rows(run, source, start, stop, chunk), wide=first)
    inverse = inverse_factor(gram)
    if inverse is None:
        raise BadInputError(
            "the PCA block lost rank (the gradients span fewer than K + p directions); "
            "lower --k or --oversample"
        )
    inverse = inverse.float()
    for start, stop in _pieces(p, piece):
        write_rows(run, target, start, read_rows(run, source, start, stop, chunk) @ inverse, chunk)


def _pca_blocked_ritz(run: RunContext, state, attrs, sizes, u, k, n) -> Subspace:
    """Rayleigh–Ritz from U = G V: eigenvalues, and the rotated basis written piece by
    piece to ``subspace/basis``. ``sizes``: (P, rows per piece, the arrays' chunk rows)."""
    p, piece, chunk = sizes
    rotation, values = ritz_rotation((u.T @ u).cpu(), k, n)
    rotation = rotation.float()
    run.store.create_rows(layout.BASIS, (p, k), "float32", chunk_rows=chunk)
    for start, stop in _pieces(p, piece):
        rows = read_rows(run, f"{state}/S{attrs['v']}", start, stop, chunk)
        write_rows(run, layout.BASIS, start, rows @ rotation, chunk)
    return Subspace(basis=None, method="pca", eigenvalues=values.numpy())
