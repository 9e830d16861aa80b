"""Sweep plans: parsing, canonical names, validation before anything is computed."""

from __future__ import annotations

import pytest

from gradcli.errors import BadInputError
from gradcli.sweep import SWEEP_PARAMETERS, check_sweep_dims, check_sweeps, parse_sweep


def test_parse_and_check_give_canonical_names_and_values():
    assert parse_sweep("k=1,5,10") == ("k", [1.0, 5.0, 10.0])
    assert parse_sweep("T=0.5, 2") == ("temperature", [0.5, 2.0])  # aliases, spaces
    plan = check_sweeps({"knn_k": [5, 1, 5.0], "lam": [0.5], "clip-dims": [2]})
    assert plan == {"k": [5, 1], "lambda": [0.5], "d": [2]}  # duplicates dropped, order kept
    assert all(isinstance(v, int) for v in plan["k"] + plan["d"])
    assert set(SWEEP_PARAMETERS) == {"k", "percentile", "lambda", "temperature", "d"}


@pytest.mark.parametrize(
    ("sweeps", "needle"),
    [
        ({"depth": [1]}, "unknown sweep parameter 'depth'"),
        ({"k": []}, "--sweep k needs at least one value"),
        ({"k": [2.5]}, "--sweep k takes whole numbers, got 2.5"),
        ({"k": [0]}, "--sweep k=0:"),  # the detector's own check, named by the sweep
        ({"percentile": [150]}, "--sweep percentile=150:"),
    ],
)
def test_impossible_sweeps_are_refused_before_any_work(sweeps, needle):
    with pytest.raises(BadInputError) as refused:
        check_sweeps(sweeps)
    assert needle in str(refused.value)


def test_parse_sweep_errors_and_clipped_dims_against_widths():
    for text in ("k", "=1,2", "k=", "k=a,b"):
        with pytest.raises(BadInputError, match="--sweep"):
            parse_sweep(text)
    check_sweep_dims({"d": [2, 9]}, {"grad": 9, "feat": 64})
    with pytest.raises(BadInputError, match="exceeds the 9 reduced gradient"):
        check_sweep_dims({"d": [10]}, {"grad": 9, "feat": 64})
