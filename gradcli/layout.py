"""The run store's layout in one place: every group and array path, which command writes
each stage, and which stages a change invalidates.

Stages form a graph: a stage records the digests of the stages it was computed from, so a
changed stage makes everything below it stale. :func:`downstream` derives "what to delete when
this stage is recomputed" from that graph, so no list of dependants is kept by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDINGS = ("grad", "feat")  # what an embedding holds that detectors are fitted on
SCORE_EMBEDDINGS = ("grad", "feat", "ensemble")  # what scores can be computed on
BASIS_CHUNK_ROWS = 1 << 20  # rows per chunk of every (P, ...) array: bases, stats, PCA state

# Groups and arrays of the statistics pass and the subspace.
STATS = "stats"
STATS_MEAN = "stats/mean"  # (P,) float32
STATS_VAR = "stats/var"  # (P,) float32
STATS_CLASS_MEANS = "stats/class_means"  # (C, P) float32, the AG subspace's input
CLASS_MEANS_CHUNK_COLUMNS = 1 << 20  # columns per chunk of stats/class_means (one row a chunk)
STATS_STATE = "stats/state"  # the statistics pass's checkpoint
SUBSPACE = "subspace"
BASIS = "subspace/basis"  # (P, K) float32
EIGENVALUES = "subspace/eigenvalues"  # (K,) float64, PCA only
SUBSPACE_CLASS_MEANS = "subspace/class_means"  # (P, C) float32, AG only
SUBSPACE_STATE = "subspace/state"  # PCA's checkpoint
EMBED = "embed"
HEAD = "head"
DETECTORS = "detectors"
SCORES = "scores"
SCORES_PARTS = "scores_parts"  # shards' chunks of input-detector scores
CALIBRATION = "calibration"
FLAGS = "flags"
RESULTS = "results"
RESULTS_FILES = ("results.json", "results.csv")


def embedding(name: str, array: str | None = None) -> str:
    """``embed/<name>`` or one of its arrays (grad, gnorm, feat, logits, labels, done)."""
    return f"{EMBED}/{name}" if array is None else f"{EMBED}/{name}/{array}"


def head_array(key: str) -> str:
    """One of the head's arrays."""
    return f"{HEAD}/{key}"


def detector(kind: str, method: str) -> str:
    """The fitted detector of ``method`` on embedding kind ``kind`` (grad or feat)."""
    return f"{DETECTORS}/{kind}/{method}"


def scores(name: str, key: str | None = None) -> str:
    """``scores/<name>`` or its scores ``<method>-<embedding>`` (N,) float64."""
    return f"{SCORES}/{name}" if key is None else f"{SCORES}/{name}/{key}"


def score_parts(name: str, key: str | None = None) -> str:
    """Shards' row chunks of the input-detector scores (``key``) of embedding ``name``."""
    return f"{SCORES_PARTS}/{name}" if key is None else f"{SCORES_PARTS}/{name}/{key}"


def calibration(key: str) -> str:
    """The calibrated threshold of scores ``key``."""
    return f"{CALIBRATION}/{key}"


def flags(name: str, key: str) -> str:
    """Per-sample OOD flags of embedding ``name`` under the calibrated scores ``key``."""
    return f"{FLAGS}/{name}/{key}"


def result(ood: str) -> str:
    """The metrics against one OOD set."""
    return f"{RESULTS}/{ood}"


@dataclass(frozen=True)
class Stage:
    """One stage of the store: its group, the command that (re)writes it and the stages its
    record names as inputs."""

    group: str
    command: str
    inputs: tuple[str, ...] = ()
    # derived stages are written again whenever their command runs: deleting them is their
    # repair; the others are rewritten by their command's --overwrite
    derived: bool = False


STAGES = {
    stage.group: stage
    for stage in (
        Stage(STATS, "extract-subspace"),
        Stage(SUBSPACE, "extract-subspace", (STATS,)),
        Stage(EMBED, "embed", (SUBSPACE,)),
        Stage(HEAD, "fit-head", (EMBED,)),
        Stage(DETECTORS, "fit-head", (HEAD, EMBED)),
        Stage(SCORES, "score", (DETECTORS, HEAD, EMBED), derived=True),
        Stage(SCORES_PARTS, "score", (DETECTORS, HEAD, EMBED), derived=True),
        Stage(CALIBRATION, "score", (SCORES,), derived=True),
        Stage(FLAGS, "score", (CALIBRATION,), derived=True),
        Stage(RESULTS, "evaluate", (SCORES,), derived=True),
    )
}


def downstream(stage: str) -> tuple[str, ...]:
    """Every stage computed, directly or not, from ``stage`` (not itself), in pipeline order:
    what a recomputed ``stage`` makes stale."""
    found: set[str] = set()
    grew = True
    while grew:
        grew = False
        for group, spec in STAGES.items():
            if group not in found and ({stage} | found) & set(spec.inputs):
                found.add(group)
                grew = True
    return tuple(group for group in STAGES if group in found)


def dependants(path: str) -> tuple[str, ...]:
    """What a recomputed stage at ``path`` makes stale: for a stage group, every stage
    downstream of it; for one embedding, the scores and flags computed from it; for a
    detector, nothing (scores record the detector they came from and are redone)."""
    group, _, name = path.partition("/")
    if not name:
        return downstream(group)
    if group == EMBED:
        return (scores(name), score_parts(name), f"{FLAGS}/{name}")
    return ()


def overwritten_by(path: str) -> str | None:
    """The command whose ``--overwrite`` recomputes the stage holding ``path`` (None for a
    derived stage or a path outside every stage)."""
    spec = STAGES.get(path.partition("/")[0])
    return spec.command if spec and not spec.derived else None


def is_derived(path: str) -> bool:
    """Whether ``path`` lies in a derived stage (scores, calibration, flags, results)."""
    spec = STAGES.get(path.partition("/")[0])
    return bool(spec and spec.derived)


def rewritten_by(path: str) -> str | None:
    """The command that recomputes the stage holding ``path`` (None for other paths)."""
    spec = STAGES.get(path.partition("/")[0])
    return spec.command if spec else None
