"""What every judge gives back, and the strict parsing of a judge's reply text.

A score is read from the judge's own reply, parsed strictly as JSON: never from the judged text, and never by
"the first number in the text". Anything else is a ``JudgeError``: NaN, infinities, fractions, booleans,
strings, nesting, repeated keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import List, Optional, Tuple

from ..errors import SDAError


class JudgeError(SDAError):
    """The judge gave no usable score (unreachable, refused, malformed or out-of-range reply)."""


@dataclass
class Judgement:
    """One judgement. ``score``: 1..100 (an integer when read from a reply, the mean of the distribution for
    expected scoring), or for the self judge its likelihood ratio r. ``amplifier``: set by a judge that maps
    its own score (the self judge); None means a = F(score) with the chosen amplifier map."""

    score: float
    judge: str
    rubric_version: str
    raw: str  # the judge's reply, as parsed (expected scoring: the digit distribution)
    seconds: float
    scoring: str = "greedy"  # "greedy" (the reply's number), "expected" (the distribution's mean) or "self"
    spread: Optional[float] = None  # standard deviation of the score distribution (expected scoring)
    distribution: Optional[List[float]] = None  # p(1..9) (expected scoring)
    coverage: Optional[float] = None  # probability the judge gave the score tokens before renormalising
    amplifier: Optional[float] = None

    def shown(self) -> str:
        """The score as a person reads it: "99/100", "65.7/100 (spread 38.5)" or "r = -0.123"."""
        return format_score(self.score, self.scoring, self.spread)

    def to_dict(self) -> dict:
        return asdict(self)


def format_score(score: Optional[float], scoring: Optional[str], spread: Optional[float] = None) -> str:
    if score is None:
        return "-"
    if scoring == "self":
        return f"r = {score:+.3f}"
    text = f"{score:.1f}/100" if isinstance(score, float) else f"{score}/100"
    return text + (f" (spread {spread:.1f})" if spread is not None else "")


class _NotStrict(ValueError):
    pass


def _no_constant(name: str):
    raise _NotStrict(f"{name} is not a number a judge may give")


def _no_repeats(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _NotStrict(f'"{_clip(key, 40)}" is given twice')
        obj[key] = value
    return obj


# Deeper JSON is refused before the recursive parser sees it: parsing it would run to the interpreter's
# recursion limit, where any finalizer the garbage collector happens to run fails as well.
MAX_NESTING = 200


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def strict_json(data):
    """json.loads without NaN/Infinity, with exact decimals (1e999 stays finite, 99.99999999999999999 stays
    a fraction) and without repeated keys. Raises ValueError (also for nesting deeper than MAX_NESTING)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, (bytes, bytearray)) else data
    # Counting is C-speed; only a reply with that many brackets at all is scanned for its depth.
    if text.count("[") + text.count("{") > MAX_NESTING and _nesting_depth(text) > MAX_NESTING:
        raise ValueError("nested too deeply")
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=Decimal, object_pairs_hook=_no_repeats)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _unfence(body: str) -> str:
    # String slicing, not a regex: "```(.*?)\\s*```" backtracks for hours on ``` and 100 000 spaces.
    if len(body) >= 6 and body.startswith("```") and body.endswith("```"):
        inner = body[3:-3]
        return (inner[4:] if inner.startswith("json") else inner).strip()
    return body


def parse_scores(text: str, keys: Tuple[str, ...]) -> Tuple[int, ...]:
    """The scores of a reply that must be exactly a JSON object of integer scores 1..100 under ``keys``
    (optionally in a ```json fence)."""
    if not isinstance(text, str):
        raise JudgeError(f"the judge's reply is not text but {type(text).__name__}")
    if not text.strip():
        raise JudgeError("the judge's reply is empty")
    try:
        obj = strict_json(_unfence(text.strip()))
    except _NotStrict as exc:
        raise JudgeError(f"the judge's reply is not a valid score object ({exc}): {_clip(text)}") from None
    except ValueError:  # includes integers too long to convert
        raise JudgeError(f"the judge's reply is not the JSON score object: {_clip(text)}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise JudgeError(f'the judge\'s reply has no "{missing[0]}": {_clip(text)}')
    scores = []
    for key in keys:
        score = obj[key]
        if isinstance(score, bool) or not isinstance(score, (int, Decimal)):
            raise JudgeError(f"the judge's score is not a number: {_clip(json.dumps(score, default=str))}")
        # Range first: int() of a huge exponent (1e999999999) would build an enormous integer.
        if not 1 <= score <= 100:
            raise JudgeError(f"the judge's score is out of range 1..100: {_clip(str(score))}")
        if isinstance(score, Decimal) and score != score.to_integral_value():
            raise JudgeError(f"the judge's score is not an integer: {score}")
        scores.append(int(score))
    return tuple(scores)


def parse_judge_reply(text: str) -> int:
    """The score of a reply that must be exactly ``{"score": N}``."""
    return parse_scores(text, ("score",))[0]


@dataclass
class PairJudgement:
    score_a: float
    score_b: float
    judge: str
    rubric_version: str
    raw: str
    seconds: float
    tie_margin: float = 0.0  # scores this close (or closer) are a tie


def _clip(text: str, n: int = 80) -> str:
    one_line = " ".join(str(text).split())
    return one_line if len(one_line) <= n else one_line[: n - 3] + "..."

