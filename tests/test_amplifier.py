"""The score -> amplifier maps of SPEC.md section 2."""

from __future__ import annotations

import math

import pytest

from sda_local.amplifier import AMPLIFIER_MAPS, ScoreError, amplifier
from sda_local.errors import InputError


@pytest.mark.parametrize("score, expected", [(20, 0.964), (40, 0.635), (50, 0.462), (60, 0.322), (80, 0.124),
                                             (90, 0.056), (100, 0.0)])
def test_paper_map_reference_values(score, expected):
    assert amplifier(score) == pytest.approx(expected, abs=1e-3)


def test_paper_map_is_decreasing_and_tends_to_one():
    values = [amplifier(s) for s in range(10, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert amplifier(1) == pytest.approx(1.0)
    assert amplifier(0.5) == pytest.approx(1.0, abs=1e-9)


def test_other_maps():
    assert amplifier(30, "linear") == pytest.approx(0.7)
    assert amplifier(100, "cosine") == pytest.approx(math.cos(math.pi / 2))
    assert amplifier(50, "exp") == pytest.approx(math.exp(-0.5))
    assert amplifier(50, "exp-shifted") == pytest.approx(math.exp(-1.5))
    assert amplifier(50, "inverse") == pytest.approx(2.0)
    assert amplifier(25, "linear-double") == pytest.approx(0.5)
    assert amplifier(80, "linear-double") == 0.0  # clamped: a negative a would reverse the steering


@pytest.mark.parametrize("score", [0, -5, 100.5, 250, float("nan"), float("inf"), None, "90", True])
def test_failed_scores_never_become_an_amplifier(score):
    for name in AMPLIFIER_MAPS:
        with pytest.raises(ScoreError):
            amplifier(score, name)


def test_unknown_map():
    with pytest.raises(InputError):
        amplifier(50, "tanh")
