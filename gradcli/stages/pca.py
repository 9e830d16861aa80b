"""PCA subspace in memory: randomised subspace iteration on ``GᵀG``, one pass over the data per
iteration, then Rayleigh–Ritz, checkpointed in ``subspace/state`` every few batches.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from gradcli import layout
from gradcli.budget import PCA_KEEP_MAX_BATCH, PCA_KEEP_MIN_BATCH, auto_batch_size
from gradcli.errors import BadInputError
from gradcli.grads import (
    LayerGradients,
    Projector,
)
from gradcli.stages import pca_blocked as pca_blocked_stage
from gradcli.stages.checks import BASIS_DTYPES, check_finite
from gradcli.stages.context import RunContext
from gradcli.stages.passes import data_pass
from gradcli.stages.pca_blocked import write_rows, write_whole
from gradcli.stages.pca_plan import PcaJob, pca_plan, start_rows
from gradcli.subspace import (
    Subspace,
    orthonormalise_,
    ritz_rotation,
)


class _Scratch:
    """A buffer reused across calls: fresh buffers of tens of MB page-fault on first touch."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def view(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        numel = int(np.prod(shape))
        buffer = self._buffer
        if (
            buffer is None
            or buffer.numel() < numel
            or (buffer.dtype, buffer.device)
            != (
                dtype,
                device,
            )
        ):
            buffer = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _accumulate_transposed(
    total: torch.Tensor, g: torch.Tensor, u: torch.Tensor, scratch: _Scratch | None = None
) -> None:
    """``total += gᵀ u``: total (r, w) float32, g (B, r) and u (B, w) float32 or bfloat16
    (whose product is formed in bf16, in ``scratch`` when given, and added in float32)."""
    if g.dtype == torch.float32:
        total.addmm_(g.T, u)
    elif scratch is None:
        total += g.T @ u
    else:
        product = scratch.view(total.shape, g.dtype, g.device)
        torch.mm(g.T, u, out=product)
        total += product


class _BackgroundWriter:
    """At most one store write running beside the computation; its errors surface on wait."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, function, *args) -> None:
        self.wait()

        def target() -> None:
            try:
                function(*args)
            except BaseException as error:  # handed to the caller's thread in wait()
                self._error = error

        self._thread = threading.Thread(target=target, name="gradcli-checkpoint", daemon=True)
        self._thread.start()

    def wait(self, raise_errors: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_errors:
            raise error


def pca(run: RunContext, job: PcaJob) -> Subspace:
    """Randomised subspace iteration on GᵀG, one pass over the data per iteration.

    Per batch, the engine's tiles give ``U = G_b V`` (a first sweep) and then
    ``Y += G_bᵀ U`` (a second sweep over the same captured batch, no second backward).
    In bfloat16 iterations both products take bf16 operands (the tile centred and scaled
    in float32 first) and accumulate Y in float32: subspace iteration converges to the
    same subspace through that rounding, 2-3× faster on hardware with native bf16.
    After T iterations a last pass forms ``(G V)ᵀ(G V)`` for the Rayleigh–Ritz step.
    The block V, the iteration, and every ``checkpoint_every`` batches the partial Y and
    the batch cursor go to ``subspace/state`` so an interrupted run resumes there.

    The plan (:func:`pca_plan`: in memory or row blocks, passes, disk) is told before the
    first pass and recorded in the subspace's attrs as ``plan``.
    """
    source, indices, selection = job.source, job.indices, job.selection
    mean, scale, k, width = job.mean, job.scale, job.k, job.width
    iterations, seed, batch_size = job.iterations, job.seed, job.batch_size
    checkpoint_every, iteration_dtype = job.checkpoint_every, job.iteration_dtype
    p = selection.size
    plan = pca_plan(
        run, selection, width, len(indices), iteration_dtype, iterations=iterations, k=k
    )
    run.progress.note(plan.note(p, width))
    run._on_writer(lambda: run.store.set_attrs(layout.SUBSPACE, plan=plan.describe()), value=False)
    if plan.blocked:
        return pca_blocked_stage.pca_blocked(run, job, plan)
    low, need = plan.dtype, plan.fixed_bytes
    state = layout.SUBSPACE_STATE
    group = run.group
    attrs = run.store.group_attrs(state) if run.store.has(state) else {}
    model = run.model
    engine = LayerGradients(model.module, selection, tile_bytes=run._tile_bytes())
    # Arrays are written to alternating slots and only then named in the state's attrs, so
    # a kill while writing one leaves the previous checkpoint intact.
    if attrs.get("width") == width and "iteration" in attrs and attrs.get("form") != "blocks":
        iteration, cursor, batch = attrs["iteration"], attrs["cursor"], attrs["batch"]
        keep = bool(attrs.get("keep", False))
        low = BASIS_DTYPES[attrs.get("iteration_dtype", "float32")]  # as it began
        if attrs.get("world", 1) != group.world:
            cursor = 0  # partial sums of another number of ranks: redo this iteration
        block = torch.from_numpy(run.store.read(f"{state}/V{iteration % 2}"))
        if block.dtype == torch.int16:  # an intermediate block saved as its bf16 copy
            block = block.view(torch.bfloat16)
    else:
        block = start_rows(seed, 0, p, width)
        orthonormalise_(block)
        iteration, cursor = 0, 0
        batch, keep = group.broadcast_object(
            _pca_batch(run, engine, source, indices, need, batch_size, low.itemsize)
        )

        def start_state() -> None:
            run.store.delete(state)
            write_whole(run, f"{state}/V0", block, plan.chunk_rows)
            run.store.set_attrs(
                state,
                width=width,
                iteration=0,
                cursor=0,
                batch=batch,
                keep=keep,
                slot=0,
                world=group.world,
                iteration_dtype=str(low).removeprefix("torch."),
            )

        run._on_writer(start_state, value=False)
    # A batch's normalised tiles, each kept contiguous (B, r) one after the other.
    kept = torch.empty(batch * p, dtype=low, device=run.device) if keep else None
    scratch = _Scratch()
    # The block's bf16 copy for the iterations' products: written by the
    # orthonormalisation while each chunk is in cache, reused across iterations.
    low_block = None
    if low != torch.float32 and run.device.type == "cpu":
        low_block = torch.empty(p, width, dtype=low)
        low_block.copy_(block)
    if block.dtype != torch.float32:
        if low_block is None:
            raise BadInputError(
                "this PCA checkpoint was saved by bfloat16 iterations on a CPU; resume it "
                "on a CPU (--device cpu) or start over with 'gradcli extract-subspace ... "
                "--overwrite'"
            )
        block = None  # the next pass needs only the copy; its Y makes the next block
    normalisation = Projector(mean, scale, torch.empty(p, 0), device=run.device)
    writer = _BackgroundWriter()
    partial = None
    if cursor:
        # Each partial sum records the iteration and cursor it holds; one that does not
        # match the state's (a checkpoint overtaken by a kill) is never added to again:
        # the iteration starts over instead, which gives the same sums.
        if group.is_writer:
            partial = _matching_partial(run, state, iteration, cursor)
        cursor = group.broadcast_object(cursor if partial or not group.is_writer else 0)
    # Each rank passes over its slice; all take the same number of steps (a rank whose
    # slice is shorter idles through the last one) so their collectives pair up.
    steps = group.steps(len(indices), batch)
    label = "PCA" if iteration < iterations else "PCA Rayleigh-Ritz"
    try:
        with run.progress.task(label, total=(iterations + 1) * steps) as advance:
            advance(iteration * steps + cursor)
            while iteration <= iterations:
                ritz = iteration == iterations
                if ritz:
                    projector = normalisation.rebased(block, torch.float32)
                else:
                    projector = normalisation.rebased(
                        block if low_block is None else low_block, low
                    )
                if cursor and group.is_writer:  # rank 0's checkpoint holds the sum so far
                    saved = torch.from_numpy(run.store.read(partial))
                    accumulator = saved if ritz else saved.to(run.device)
                elif ritz:
                    accumulator = torch.zeros(width, width, dtype=torch.float64)
                else:
                    accumulator = torch.zeros(p, width, device=run.device)

                def save(done: int, accumulator=accumulator, iteration=iteration) -> None:
                    # Checkpoints hold sums over all ranks: rank 0 keeps the sum so far, the
                    # others start again from zero.
                    group.all_reduce_(accumulator)
                    if not group.is_writer:
                        accumulator.zero_()
                    writer.wait()  # this iteration's block must be named first
                    run._on_writer(
                        functools.partial(_save_partial, run, plan.chunk_rows),
                        state,
                        accumulator,
                        iteration,
                        done,
                        value=False,
                    )

                for step in data_pass(
                    run,
                    source,
                    indices,
                    batch,
                    engine=engine,
                    start=cursor,
                    ranks=True,
                    stop_message="stopped after saving PCA progress; rerun the same command to "
                    "resume",
                    checkpoint_every=checkpoint_every,
                    checkpoint=save,
                    before_stop=writer.wait,
                ):
                    if step.x is not None:
                        _pca_batch_step(
                            run,
                            engine,
                            projector,
                            step.size,
                            accumulator,
                            ritz,
                            kept,
                            source.spec,
                            scratch,
                        )
                    advance(1)
                group.all_reduce_(accumulator)
                if ritz:
                    writer.wait()
                    if not group.is_writer:
                        return None
                    sizes = (k, plan.chunk_rows)
                    return _ritz_to_store(run, block, accumulator, sizes, len(indices))
                writer.wait()
                block = accumulator.cpu()
                del accumulator, projector
                # The block that feeds Rayleigh–Ritz is orthonormal to rounding (two
                # rounds); an intermediate one only needs to span the right subspace.
                orthonormalise_(
                    block,
                    rounds=2 if iteration + 1 == iterations else 1,
                    low_copy=low_block,
                )
                group.broadcast_(block)  # every rank goes on with rank 0's block
                if low_block is not None and group.world > 1:
                    low_block.copy_(block)
                iteration, cursor = iteration + 1, 0
                # The next pass starts at once; the block is named in the state only
                # after its write has finished (a kill before that resumes one iteration
                # earlier, from the intact previous slot).
                if group.is_writer:
                    # In bf16 iterations an intermediate block is used only through its
                    # bf16 copy, so that copy is all a resume needs: half the bytes.
                    intermediate = low_block is not None and iteration < iterations
                    saved = low_block if intermediate else block
                    save_block = functools.partial(_save_block, run, plan.chunk_rows)
                    writer.start(save_block, state, iteration, saved)
    finally:
        writer.wait(raise_errors=False)
    raise AssertionError("unreachable")


def _pca_batch(
    run: RunContext,
    engine: LayerGradients,
    source,
    indices,
    fixed: int,
    batch_size: int | None,
    itemsize: int = 4,
) -> tuple[int, bool]:
    """PCA batch size, and whether a batch's normalised gradients (B×P, ``itemsize``
    bytes each) are kept between the two products so the second needs no second sweep
    of the engine."""
    free = run._free_for_batches(engine, source, indices, fixed)
    per_sample = engine.sample_bytes()
    kept_bytes = itemsize * engine.selection.size
    if batch_size is not None:
        return batch_size, batch_size * (per_sample + kept_bytes) <= free
    keep_batch = auto_batch_size(per_sample + kept_bytes, free, cap=PCA_KEEP_MAX_BATCH)
    if keep_batch >= PCA_KEEP_MIN_BATCH:
        return keep_batch, True
    return auto_batch_size(per_sample, free), False


def _pca_batch_step(
    run: RunContext,
    engine: LayerGradients,
    projector: Projector,
    n: int,
    accumulator: torch.Tensor,
    ritz: bool,
    kept: torch.Tensor | None,
    spec: str,
    scratch: _Scratch | None = None,
) -> None:
    """One batch of one PCA pass: ``U = G_b V``, then ``Y += G_bᵀ U`` (or, in the
    Rayleigh–Ritz pass, ``UᵀU``) into ``accumulator``. ``kept`` (≥ B·P,) holds the
    batch's normalised tiles, each contiguous, between the two products. The engine holds
    the batch's ``n`` captured samples."""
    u = torch.zeros(n, projector.k, dtype=torch.float64, device=run.device)
    unused = torch.zeros(n, dtype=torch.float64, device=run.device)
    keeping = not ritz and kept is not None
    pieces, offset = [], 0
    for start, tile in engine.tiles():
        out = None
        if keeping:
            out = kept[offset : offset + tile.numel()].view(tile.shape)
            offset += tile.numel()
            pieces.append((start, out))
        projector.add(start, tile, u, unused, out=out, in_place=True)
    check_finite(u, "gradients", spec)
    if ritz:
        accumulator += (u.T @ u).cpu()
        return
    weights = u.to(projector.dtype)
    if not keeping:
        pieces = (
            (start, projector.normalise(start, tile, in_place=True).to(projector.dtype))
            for start, tile in engine.tiles()
        )
    for start, g in pieces:
        rows = slice(start, start + g.shape[1])
        _accumulate_transposed(accumulator[rows], g, weights, scratch)


def _save_block(
    run: RunContext, chunk_rows: int, state: str, iteration: int, block: torch.Tensor
) -> None:
    """Checkpoint the block of ``iteration`` (runs in the background writer); a bf16
    block is stored as its bit pattern (int16)."""
    if block.dtype == torch.bfloat16:
        block = block.view(torch.int16)
    write_whole(run, f"{state}/V{iteration % 2}", block, chunk_rows)
    run.store.set_attrs(state, iteration=iteration, cursor=0)


def _save_partial(
    run: RunContext,
    chunk_rows: int,
    state: str,
    accumulator: torch.Tensor,
    iteration: int,
    cursor: int,
) -> None:
    """Checkpoint an iteration's partial sum after ``cursor`` steps (rank 0 only), in the
    slot the state does not name; the array records what it holds."""
    slot = 1 - run.store.group_attrs(state).get("slot", 0)
    path = f"{state}/partial{slot}"
    write_whole(run, path, accumulator.cpu(), chunk_rows)
    run.store.set_attrs(path, iteration=iteration, cursor=cursor)  # last: vouches for the rows
    run.store.set_attrs(state, cursor=cursor, slot=slot, world=run.group.world)


def _matching_partial(run: RunContext, state: str, iteration: int, cursor: int) -> str | None:
    """The stored partial sum of ``iteration`` after ``cursor`` steps, if one is intact."""
    slot = run.store.group_attrs(state).get("slot", 0)
    for candidate in (slot, 1 - slot):
        path = f"{state}/partial{candidate}"
        held = run.store.group_attrs(path) if run.store.has(path) else {}
        if held.get("iteration") == iteration and held.get("cursor") == cursor:
            return path
    return None


def _ritz_to_store(
    run: RunContext, block: torch.Tensor, gram: torch.Tensor, sizes: tuple[int, int], n: int
) -> Subspace:
    """Rayleigh–Ritz from ``gram = (G V)ᵀ(G V)`` (w, w) float64 of the orthonormal block
    (P, w) float32: the basis V·R (P, k) float32 written to the store piece by piece (no
    second P-row array), and the eigenvalues. ``sizes``: (k, the basis's chunk rows)."""
    k, chunk_rows = sizes
    rotation, values = ritz_rotation(gram, k, n)
    rotation = rotation.float()  # orthogonal: applying it in float32 loses nothing visible
    p = block.shape[0]
    run.store.create_rows(layout.BASIS, (p, k), "float32", chunk_rows=chunk_rows)
    step = max(1, chunk_rows)
    for start in range(0, p, step):
        write_rows(run, layout.BASIS, start, block[start : start + step] @ rotation, chunk_rows)
    return Subspace(basis=None, method="pca", eigenvalues=values.numpy())
