"""The store layout and its stage graph: ``downstream`` against a brute-force reachability,
the invalidations a user relies on, ``rewritten_by``, and every path helper landing in a stage."""

from __future__ import annotations

import inspect
from collections import deque

import pytest

from gradcli import layout


def reachable_below(stage: str) -> set[str]:
    """Every stage that names ``stage`` as an input, directly or not: a BFS over the reverse
    of the graph ``STAGES[*].inputs``, built here independently of ``layout.downstream``."""
    users: dict[str, set[str]] = {group: set() for group in layout.STAGES}
    for group, spec in layout.STAGES.items():
        for source in spec.inputs:
            users.setdefault(source, set()).add(group)
    seen: set[str] = set()
    queue = deque(users.get(stage, ()))
    while queue:
        group = queue.popleft()
        if group not in seen:
            seen.add(group)
            queue.extend(users.get(group, ()))
    seen.discard(stage)
    return seen


def test_stage_graph_is_closed_and_acyclic():
    order = list(layout.STAGES)
    for group, spec in layout.STAGES.items():
        assert spec.group == group
        for source in spec.inputs:
            assert source in layout.STAGES, f"{group} names unknown input {source!r}"
            # Pipeline order: every input comes before the stage computed from it.
            assert order.index(source) < order.index(group), f"{source} after {group}"
        assert group not in reachable_below(group), f"{group} is computed from itself"


@pytest.mark.parametrize("stage", list(layout.STAGES))
def test_downstream_matches_brute_force_in_pipeline_order(stage):
    found = layout.downstream(stage)
    assert isinstance(found, tuple)
    assert len(found) == len(set(found))
    assert set(found) == reachable_below(stage)
    assert stage not in found
    pipeline = list(layout.STAGES)
    assert list(found) == sorted(found, key=pipeline.index)


def test_downstream_of_unknown_group_is_empty():
    assert layout.downstream("no-such-stage") == ()


def test_invalidations_users_rely_on():
    below_subspace = set(layout.downstream(layout.SUBSPACE))
    assert {
        layout.EMBED,
        layout.HEAD,
        layout.DETECTORS,
        layout.SCORES,
        layout.CALIBRATION,
        layout.FLAGS,
        layout.RESULTS,
    } <= below_subspace
    assert layout.STATS not in below_subspace
    assert set(layout.downstream(layout.STATS)) == below_subspace | {layout.SUBSPACE}

    below_head = set(layout.downstream(layout.HEAD))
    assert layout.EMBED not in below_head
    assert {layout.DETECTORS, layout.SCORES, layout.RESULTS} <= below_head

    # Recalibrating redoes the flags but leaves scores and results alone.
    assert layout.downstream(layout.CALIBRATION) == (layout.FLAGS,)
    assert layout.downstream(layout.RESULTS) == ()
    assert layout.downstream(layout.FLAGS) == ()


@pytest.mark.parametrize(
    ("path", "command"),
    [
        ("stats/mean", "extract-subspace"),
        ("subspace/basis", "extract-subspace"),
        ("subspace", "extract-subspace"),
        ("embed/cifar10-test/grad", "embed"),
        ("head/fc.weight", "fit-head"),
        ("detectors/grad/knn", "fit-head"),
        ("scores/svhn-test/knn-grad", "score"),
        ("scores_parts/svhn-test/odin-feat", "score"),
        ("calibration/knn-grad", "score"),
        ("flags/svhn-test/knn-grad", "score"),
        ("results/svhn", "evaluate"),
        ("embeddings/x", None),  # a prefix of a group's name is not that group
        ("results.json", None),
        (".locks/embed", None),
        ("", None),
    ],
)
def test_rewritten_by(path, command):
    assert layout.rewritten_by(path) == command


def path_helpers() -> list[tuple[str, object]]:
    """The public functions of layout that build a store path: those returning a plain str
    (the graph's return tuples, optional commands or booleans)."""
    return [
        (name, fn)
        for name, fn in inspect.getmembers(layout, inspect.isfunction)
        if fn.__module__ == layout.__name__
        and not name.startswith("_")
        and inspect.signature(fn).return_annotation in ("str", str)
    ]


def test_path_helpers_are_found():
    names = {name for name, _ in path_helpers()}
    assert {"embedding", "head_array", "detector", "scores", "calibration", "flags"} <= names


@pytest.mark.parametrize(("name", "helper"), path_helpers())
def test_every_path_helper_starts_with_a_stage_group(name, helper):
    params = inspect.signature(helper).parameters
    required = [p for p in params.values() if p.default is inspect.Parameter.empty]
    every = list(params.values())
    calls = [
        [f"a{i}" for i in range(len(required))],
        [f"a{i}" for i in range(len(every))],
    ]
    for args in calls:
        path = helper(*args)
        assert isinstance(path, str), f"{name}{tuple(args)} is not a path"
        group, _, rest = path.partition("/")
        assert group in layout.STAGES, f"{name}{tuple(args)} = {path!r}: not under a stage"
        # The arguments are the last segments, in order: nothing is dropped or reordered.
        assert rest.split("/")[len(rest.split("/")) - len(args) :] == args, f"{name} -> {path!r}"
        assert layout.rewritten_by(path) == layout.STAGES[group].command


def test_path_constants_start_with_a_stage_group():
    constants = {
        name: value
        for name, value in vars(layout).items()
        if name.isupper() and isinstance(value, str)
    }
    assert "BASIS" in constants and "STATS_MEAN" in constants
    for name, value in constants.items():
        assert value.partition("/")[0] in layout.STAGES, f"layout.{name} = {value!r}"


def test_overwritten_by_names_the_command_with_overwrite_and_derived_stages_have_none():
    assert layout.overwritten_by("stats/mean") == "extract-subspace"
    assert layout.overwritten_by("embed/cifar10-test/grad") == "embed"
    assert layout.overwritten_by("detectors/grad/knn") == "fit-head"
    for path in ("scores/x/knn-grad", "calibration/knn-grad", "flags/x/knn-grad", "results/o"):
        assert layout.overwritten_by(path) is None
        assert layout.is_derived(path)
    assert not layout.is_derived("head/weight") and not layout.is_derived("results.json")


def test_dependants_of_one_embedding_are_its_scores_and_flags_only():
    assert set(layout.dependants("embed/a")) == {"scores/a", "scores_parts/a", "flags/a"}
    assert layout.dependants("detectors/grad/knn") == ()
    assert layout.dependants("head") == layout.downstream("head")
