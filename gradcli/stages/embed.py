"""The embed stage: reduced gradients ``G(x)·V`` (N, K), their norms, features, logits and
labels of one dataset under ``embed/<name>``, in row chunks that resume after a kill and that
concurrent shards fill disjointly. A basis beyond the memory budget is applied in parameter
blocks, one pass each, with partial sums kept in the store.
"""

from __future__ import annotations

import numpy as np
import torch

from gradcli import layout
from gradcli.budget import format_size
from gradcli.distributed import check_shard, shard_range
from gradcli.errors import BadInputError, Interrupted, StaleStoreError
from gradcli.grads import (
    LayerGradients,
    Projector,
)
from gradcli.stages import defaults, runner
from gradcli.stages.checks import (
    BASIS_DTYPES,
    check_batch_size,
    check_finite,
    check_name,
    check_seed,
)
from gradcli.stages.context import RunContext
from gradcli.stages.passes import data_pass
from gradcli.store import MAX_CHUNK_BYTES


def _projector(run: RunContext, start: int, stop: int) -> Projector:
    """The projection for basis rows [start, stop), read from the store."""
    if not run.store.stage_complete(layout.SUBSPACE):
        raise BadInputError(
            f"store {run.store.url} has no finished subspace; run 'gradcli extract-subspace' first"
        )
    no_variance = run.store.group_attrs(layout.SUBSPACE)["provenance"]["no_variance"]
    mean = torch.from_numpy(run.store.read_rows(layout.STATS_MEAN, start, stop))
    if no_variance:
        scale = torch.ones_like(mean)
    else:
        scale = torch.from_numpy(run.store.read_rows(layout.STATS_VAR, start, stop)).sqrt()
    starts = np.concatenate([[0], np.cumsum(run.selection.sizes)])
    bounds = [start, *[int(s) for s in starts if start < s < stop], stop]
    dtype = BASIS_DTYPES[run.basis_dtype]
    if dtype == torch.float32:
        parts = [torch.from_numpy(a) for a in run.store.read_rows_transposed(layout.BASIS, bounds)]
    else:
        parts = _read_basis_as(run, bounds, dtype)
    return Projector(
        mean,
        scale,
        parts,
        start=start,
        dtype=BASIS_DTYPES[run.basis_dtype],
        device=run.device,
        transposed=True,
    )


def _read_basis_as(run: RunContext, bounds: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """Basis rows [bounds[j], bounds[j + 1]) as transposed parts (K, r_j) in ``dtype``,
    converted one store chunk at a time (no float32 copy of the block beside them)."""
    k = int(run.store.shape(layout.BASIS)[1])
    step = max(1, MAX_CHUNK_BYTES // (4 * k))
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = torch.empty(k, b - a, dtype=dtype)
        first = a
        while first < b:
            last = min(b, (first // step + 1) * step)
            piece = run.store.read_rows_transposed(layout.BASIS, [first, last])[0]
            part[:, first - a : last - a].copy_(torch.from_numpy(piece))
            first = last
        parts.append(part)
    return parts


def embed_plan(run: RunContext, blocks: list, n: int, k: int, feat: int, classes: int) -> dict:
    """Embed's plan as plain numbers: passes over the data (one per row block), the basis
    dtype, and the bytes it writes (the arrays, and the float64 partial sums of a run in
    several blocks, deleted at the end)."""
    arrays = n * (4 * k + 4 + 4 * feat + 4 * classes + 8)
    partials = 2 * n * (8 * k + 8) if len(blocks) > 1 else 0
    return {
        "passes": len(blocks),
        "row_blocks": len(blocks),
        "disk_bytes": arrays + partials,
        "basis_dtype": run.basis_dtype,
    }


def embed(
    run: RunContext,
    dataset: str,
    *,
    name: str | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    seed: int = defaults.SEED,
    chunk_rows: int = defaults.CHUNK_ROWS,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
) -> str:
    """Reduced gradients, features, logits and labels of a dataset; returns the name.

    When the basis does not fit the memory budget, the parameters are split into row
    blocks and the data is passed once per block; partial sums are kept in the store so
    the result equals the unsplit run and an interrupted run resumes per block and chunk.

    ``shard=(i, n)``: compute only the chunks :func:`gradcli.distributed.shard_range`
    gives shard ``i`` of ``n`` (processes started at once on one store write disjoint
    chunks); the stage is completed by whichever process finds every chunk done, so check
    ``store.stage_complete(f"embed/{name}")`` afterwards.
    """
    run.store.require()  # a store never made: say so, make nothing
    batch_size = check_batch_size(batch_size)
    seed = check_seed(seed)
    if chunk_rows < 1:
        raise BadInputError("--chunk-rows must be at least 1")
    shared = shard is not None
    if shared:
        check_shard(*shard, "shard")
        if overwrite:
            raise BadInputError(
                "--overwrite cannot be combined with --shard (one shard would delete rows "
                "another wrote); recompute once without --shard, or use a new --name"
            )
    source = run.resolve(dataset)
    defaulted = name is None
    name = name or source.slug
    check_name(name)
    path = layout.embedding(name)
    if defaulted and not overwrite and run.store.has(path):
        stored = (run.store.group_attrs(path).get("provenance") or {}).get("dataset")
        if stored and stored != source.spec:
            raise BadInputError(
                f"the name '{name}' already holds the embedding of {stored}; embed "
                f"{source.spec} under a name of its own (gradcli embed --dataset "
                f"{source.spec} --name NAME; in Python embed(spec, name=NAME)) and use "
                f"NAME, or replace the stored one (gradcli embed --dataset {source.spec} "
                "--overwrite)"
            )
    model = run.model
    selection = run.selection
    if not run.store.stage_complete(layout.SUBSPACE):
        _projector(run, 0, 0)  # raises the "extract-subspace first" error
    k = int(run.store.shape(layout.BASIS)[1])
    indices = run._subset(len(source), max_samples, seed)
    record = {
        "subspace": run.store.stage_digest(layout.SUBSPACE),
        "dataset": source.spec,
        "fingerprint": source.fingerprint(),
        "rows": int(len(indices)),
        "max_samples": max_samples,
        "seed": seed,
        "preprocess": model.preprocess.to_dict(),
        "basis_dtype": run.basis_dtype,
    }
    attrs = run.store.group_attrs(path) if run.store.has(path) else {}
    left_out = attrs.get("skipped_images") or 0
    changed = attrs.get("provenance") != record
    if left_out and changed and run.on_bad_image == "fail" and not overwrite:
        raise StaleStoreError(
            f"embedding '{name}' was made with --on-bad-image skip ({left_out} unreadable "
            "image(s) left out); pass --on-bad-image skip here too"
        )
    # stored scores and flags name the embedding they came from: a new one makes them stale
    if runner.open_stage(
        run,
        path,
        record,
        overwrite=overwrite,
        what=f"embedding '{name}'",
        shared=shared,
        collective=False,
    ):
        return name
    blocks = run._row_blocks(selection, k)
    # A TorchScript model takes no hooks: its features come from a forward pass of their own.
    scripted = isinstance(model.module, torch.jit.ScriptModule)
    feature_module = None if scripted else model.module.get_submodule(model.feature_layer)
    engines = [
        LayerGradients(
            model.module,
            selection,
            only=names,
            rows=(start, stop),
            feature_module=feature_module if i == 0 else None,
            tile_bytes=run._tile_bytes(),
        )
        for i, (start, stop, names) in enumerate(blocks)
    ]
    probe, _ = next(iter(run._loader(source, indices[:1], 1)))
    logits, feat = engines[0].capture(probe.to(run.device))
    feat = _features(run, probe.to(run.device), feat)
    arrays = {
        "grad": ((k,), "float32"),
        "gnorm": ((), "float32"),
        "feat": ((feat.shape[1],), "float32"),
        "logits": ((logits.shape[1],), "float32"),
        "labels": ((), "int64"),
    }
    if len(blocks) > 1:
        # Block b reads slot (b - 1) % 2 and writes slot b % 2: redoing a block after a
        # kill never adds its terms twice.
        for slot in (0, 1):
            arrays.update({f"partial{slot}": ((k,), "float64")})
            arrays.update({f"partial_gnorm2_{slot}": ((), "float64")})
    bytes_per_row = k * BASIS_DTYPES[run.basis_dtype].itemsize + 8
    block_rows = max(stop - start for start, stop, _ in blocks)
    fixed = block_rows * bytes_per_row
    batch = batch_size or min(run._batch_size(engine, source, indices, fixed) for engine in engines)
    for engine in engines:
        engine.release()
    # The first writer records its batch size; later shards and resumes use it, so every
    # chunk is computed in the same batches whoever computes it (bitwise-equal arrays).
    meta = {"batch_size": int(batch), "shards": shard[1] if shared else 1}
    rows_per_chunk = min(chunk_rows, max(1, len(indices)))  # a chunk beyond the data is moot
    chunks = run.store.row_chunks(
        path, len(indices), rows_per_chunk, arrays, shared=shared, meta=meta
    )
    if batch_size is None:
        batch = int(chunks.meta.get("batch_size", batch))
    plan = embed_plan(run, blocks, len(indices), k, feat.shape[1], logits.shape[1])
    if len(blocks) > 1:
        run.progress.note(
            f"the basis ({selection.size:,} rows x {k}, {run.basis_dtype}) exceeds the memory "
            f"budget: {len(blocks)} passes over the data, one per row block, writing up to "
            f"{format_size(plan['disk_bytes'])}"
        )
    run.store.set_attrs(path, plan=plan)
    block_done = run.store.flags(path, "block_done", len(blocks) * chunks.n_chunks, shared=shared)
    pending = chunks.pending()
    if shared:
        own = shard_range(chunks.n_chunks, *shard)
        pending = [chunk for chunk in pending if chunk in own]
    total = len(blocks) * sum(len(chunks.chunk_range(i)) for i in pending)
    with run.progress.task(f"embed {name}", total=total) as advance:
        for b, ((start, stop, _), engine) in enumerate(zip(blocks, engines, strict=True)):
            projector = _projector(run, start, stop)
            for chunk in pending:
                rows = chunks.chunk_range(chunk)
                flag = b * chunks.n_chunks + chunk
                if block_done[flag]:
                    advance(len(rows))
                    continue
                first, last = b == 0, b == len(blocks) - 1
                parts = _embed_rows(
                    run,
                    source,
                    indices[rows.start : rows.stop],
                    batch,
                    engine,
                    projector,
                    None if first else (chunks, chunk, (b - 1) % 2),
                )
                if not last:
                    parts[f"partial{b % 2}"] = parts.pop("z")
                    parts[f"partial_gnorm2_{b % 2}"] = parts.pop("gnorm2")
                else:
                    parts["grad"] = parts.pop("z").astype(np.float32)
                    parts["gnorm"] = np.sqrt(parts.pop("gnorm2")).astype(np.float32)
                chunks.write(chunk, parts)
                if last:
                    chunks.mark_done(chunk)
                else:
                    block_done[flag] = True
                advance(len(rows))
                if run.should_stop():
                    raise Interrupted(
                        f"stopped after a finished chunk of '{name}'; rerun the same "
                        "command to resume"
                    )
            engine.release()
            del projector
    if shared and not chunks.done().all():
        return name  # other shards are still at work; the last to finish completes it
    for leftover in ("partial0", "partial1", "partial_gnorm2_0", "partial_gnorm2_1"):
        run.store.delete(f"{path}/{leftover}")
    run.store.delete(f"{path}/block_done")
    skipped = run.skipped.get(source.spec, [])
    run.store.complete_stage(
        path,
        rows=len(indices),
        dataset=source.spec,
        has_labels=source.has_labels,
        skipped_images=len(skipped),
        skipped_examples=skipped[:100],
    )
    return name


def _embed_rows(
    run: RunContext, source, indices, batch, engine, projector, partial_from=None
) -> dict[str, np.ndarray]:
    """One block's contribution for the given rows, batch by batch.

    Returns z (n, K) and gnorm2 (n,) float64 sums (continuing the stored partial sums of
    earlier blocks when ``partial_from`` = (row chunks, chunk, slot) is given) and, on the
    first block, the features, logits and labels.
    """
    n = len(indices)
    if partial_from is None:
        z = torch.zeros(n, projector.k, dtype=torch.float64, device=run.device)
        gnorm2 = torch.zeros(n, dtype=torch.float64, device=run.device)
    else:
        chunks, chunk, slot = partial_from
        z = torch.from_numpy(chunks.read_chunk(f"partial{slot}", chunk)).to(run.device)
        gnorm2 = torch.from_numpy(chunks.read_chunk(f"partial_gnorm2_{slot}", chunk))
        gnorm2 = gnorm2.to(run.device)
    out: dict[str, list] = {"feat": [], "logits": [], "labels": []}
    for step in data_pass(run, source, indices, batch, engine=engine, name_rows=True):
        rows = step.rows
        feat = _features(run, step.x, step.features) if partial_from is None else None
        for start, tile in engine.tiles():
            projector.add(start, tile, z[rows], gnorm2[rows], in_place=True)
        check_finite(z[rows], "gradients", source.spec, indices[rows])  # NaN/Inf propagate
        if feat is not None:
            out["feat"].append(feat.cpu().numpy())
            out["logits"].append(step.logits.float().cpu().numpy())
            out["labels"].append(step.y.numpy().astype(np.int64))
    result = {"z": z.cpu().numpy(), "gnorm2": gnorm2.cpu().numpy()}
    if partial_from is None:
        result.update({key: np.concatenate(v) for key, v in out.items()})
    return result


def _features(run: RunContext, x: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
    """Features (B, D) float32 of a batch: those the capture hooked, else (a TorchScript
    model) from one more forward pass."""
    if captured is not None:
        return captured
    with torch.inference_mode():
        return run.model.features_and_logits(x)[0].flatten(1).float()
