"""Stored embeddings by name or dataset spec: which exist, what they were made from, loading
them, and embedding a dataset on demand when a later stage needs it.
"""

from __future__ import annotations

import numpy as np

from gradcli import data as data_mod
from gradcli import layout
from gradcli.errors import BadInputError, GradcliError
from gradcli.stages import embed as embed_stage
from gradcli.stages.checks import check_batch_size, preferred
from gradcli.stages.context import RunContext


def embedding_names(run: RunContext) -> list[str]:
    """Names of the embeddings in the store, finished or not."""
    return run.store.children(layout.EMBED) if run.store.has(layout.EMBED) else []


def _embeddings_of(
    run: RunContext, spec: str
) -> tuple[data_mod.ImageSource | None, dict[str, dict]]:
    """The source of a dataset spec (None when it is no readable spec) and its stored
    embeddings, name -> recorded provenance."""
    try:
        source = data_mod.resolve_dataset(spec, data_root=run.data_root)
    except GradcliError:
        return None, {}
    records = {
        name: run.store.group_attrs(layout.embedding(name)).get("provenance") or {}
        for name in embedding_names(run)
    }
    return source, {n: r for n, r in records.items() if r.get("dataset") == source.spec}


def stored_name(run: RunContext, spec_or_name: str) -> str:
    """The store name of an embedding given by its name or by its dataset's spec."""
    names = embedding_names(run)
    if spec_or_name in names:
        return spec_or_name
    source, found = _embeddings_of(run, spec_or_name)
    chosen = preferred(source, list(found))
    if chosen is not None:
        return chosen
    if found:
        raise BadInputError(
            f"{source.spec} is embedded as {', '.join(found)}: name the one you mean"
        )
    raise BadInputError(
        f"no embedding '{spec_or_name}' in {run.store.url} (stored: "
        f"{', '.join(names) or 'none'}); embed it first: gradcli embed --dataset SPEC"
    )


def load_embedding(run: RunContext, name: str) -> dict[str, np.ndarray]:
    """The arrays of a finished embedding, by name or dataset spec: grad (N,K), gnorm (N,),
    feat (N,D), logits (N,C) float32 and labels (N,) int64."""
    run.store.require()  # a store never made: say so, make nothing
    name = stored_name(run, name)
    path = layout.embedding(name)
    if not run.store.stage_complete(path):
        raise BadInputError(
            f"embedding '{name}' is unfinished in {run.store.url}; finish it with "
            f"'gradcli embed --name {name} --dataset SPEC', or score it by name"
        )
    return {
        key: run.store.read(f"{path}/{key}")
        for key in ("grad", "gnorm", "feat", "logits", "labels")
    }


def embedding_for(run: RunContext, spec_or_name: str, *, batch_size: int | None = None) -> str:
    """The store name of a dataset's embedding (a stored name is kept), embedding it first
    when it is not there yet."""
    return ensure_embedded(run, spec_or_name, batch_size=check_batch_size(batch_size))


def _embedded_as(run: RunContext, spec: str, max_samples: int | None, seed: int) -> str | None:
    """The stored name of an embedding of ``spec`` with this subset, preferring its
    default name; None when there is none or several."""
    source, found = _embeddings_of(run, spec)
    same_subset = [
        name
        for name, record in found.items()
        if record.get("max_samples") == max_samples
        and (max_samples is None or record.get("seed", 0) == seed)
    ]
    return preferred(source, same_subset)


def note_embedding(
    run: RunContext, spec: str, who: str, max_samples: int | None = None, seed: int = 0
) -> None:
    """Say that ``who`` embeds ``spec`` first when no finished embedding of it is stored
    (that is where its time goes)."""
    if spec in embedding_names(run):
        name = spec
    else:
        try:
            name = _embedded_as(run, spec, max_samples, seed)
        except GradcliError:
            return  # the embedding itself names the problem
    if name is None or not run.store.stage_complete(layout.embedding(name)):
        run.progress.note(f"{who}: embedding {spec} first (no stored embedding)")


def ensure_embedded(run: RunContext, spec_or_name: str, **kwargs) -> str:
    """The name of a finished embedding of a dataset spec or stored name, computing or
    finishing it first (an interrupted embedding resumes from its recorded dataset; a
    spec embedded under a name of its own is found by that name)."""
    names = embedding_names(run)
    if spec_or_name not in names:
        found = _embedded_as(run, spec_or_name, kwargs.get("max_samples"), kwargs.get("seed", 0))
        if found is not None:
            return embed_stage.embed(run, spec_or_name, name=found, **kwargs)
    if spec_or_name in names:
        if run.store.stage_complete(layout.embedding(spec_or_name)):
            return spec_or_name
        record = run.store.group_attrs(layout.embedding(spec_or_name)).get("provenance") or {}
        if record.get("dataset"):
            kwargs.update(max_samples=record.get("max_samples"), seed=record.get("seed", 0))
            return embed_stage.embed(run, record["dataset"], name=spec_or_name, **kwargs)
    return embed_stage.embed(run, spec_or_name, **kwargs)


def id_spec(run: RunContext, which: str) -> str:
    spec = run.store.attrs.get(f"id_{which}")
    if not spec:
        option = "fit-head --train SPEC" if which == "train" else "--id-test SPEC"
        raise BadInputError(
            f"store {run.store.url} does not know the ID {which} set; pass {option}"
        )
    return spec
