"""Pillar 1 of SDA (SPEC.md section 2): the amplifier a = F(S) from an evaluator's score S in (0, 100].

The paper's map is the default; the others of the reference code are selectable by name. A score that is
missing, non-finite or outside (0, 100] is an evaluator failure and raises: it never becomes a = -1 (which
would reverse the steering, as in the reference code). Maps that can go negative are clamped at 0 for the
same reason.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

from .errors import InputError

AmplifierMap = Callable[[float], float]

AMPLIFIER_MAPS: Dict[str, AmplifierMap] = {
    "sigmoid": lambda s: 2.0 * (1.0 / (1.0 + math.exp(1.0 - 100.0 / s)) - 0.5),  # paper, Eq. 3
    "linear": lambda s: 1.0 - s / 100.0,
    "cosine": lambda s: math.cos(s * math.pi / 200.0),
    "exp": lambda s: math.exp(-s / 100.0),
    "exp-shifted": lambda s: math.exp(-s / 100.0 - 1.0),
    "inverse": lambda s: 100.0 / s,
    "linear-double": lambda s: 1.0 - 2.0 * s / 100.0,
}
DEFAULT_MAP = "sigmoid"


class ScoreError(InputError):
    """A score that cannot set an amplifier (an evaluator failure)."""


def amplifier(score: float, map_name: str = DEFAULT_MAP) -> float:
    """a = F(score) for a score in (0, 100], never negative."""
    if map_name not in AMPLIFIER_MAPS:
        raise InputError(f"unknown amplifier map {map_name!r} (choose from {', '.join(AMPLIFIER_MAPS)})")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ScoreError(f"the score must be a finite number, got {score!r}")
    if not 0.0 < score <= 100.0:
        raise ScoreError(f"the score must be in (0, 100], got {score}")
    return max(0.0, AMPLIFIER_MAPS[map_name](float(score)))
