"""Defaults of the stages' own options, each written once: the stage functions' signatures
and the CLI's flags both read them (detector options live in :mod:`gradcli.scores.options`,
the head's in :class:`gradcli.head.HeadOptions`). Nothing here imports torch, so the CLI can
build its flags without loading it."""

from __future__ import annotations

PCA_OVERSAMPLE = 10  # extra columns p of PCA's block beyond K
PCA_ITERATIONS = 4  # subspace iterations T before Rayleigh–Ritz
CHECKPOINT_EVERY = 50  # batches between saved progress of the statistics pass and PCA
CHUNK_ROWS = 512  # rows per stored chunk of an embedding: the unit of resuming and sharding
ALPHA = 1.0  # ensemble weight: feature score + ALPHA * gradient score
SEED = 0  # seed of --max-samples subsets and PCA's start
