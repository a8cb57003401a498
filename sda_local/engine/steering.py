"""How the two streams are contrasted: the paper's formula, or steering that does not reward copying.

The paper's steering term g (l_with - l_without), g = k a, is largest for the tokens the without-stream finds
nearly impossible, and the instruction's own words are such tokens: the with-prompt makes them likely by
copying. ``Steering`` adds three bounded variants beside the paper's formula (mode "paper", bit for bit as
before):

* ``clip`` c > 0: the contrast is bounded, l = l_with + g clamp(l_with - l_without, -c, c);
* ``plausibility`` alpha > 0: contrastive decoding's adaptive plausibility constraint, tokens with
  p_with < alpha max p_with are dropped before the contrast;
* ``echo_run`` L > 0, the echo guard (for a > 0): a token that would make the answer's last L tokens a run of the
  instruction's tokens gets the without-instruction log-probability, l = l_without: it is as likely as the
  model finds it without having read the instruction, so the instruction is not recited, while a text
  the answer has begun on its own (an end phrase, a postscript) still continues. Runs are found as llama.cpp's
  DRY sampler finds repeats: one match length per instruction position, advanced with each accepted token.

``fuse_steered_numpy`` is the float64 reference of the native sampler's guarded mode (tests hold them equal).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy.special import log_softmax

from ..errors import InputError
from .fusion import log_probs_and_js, temperature_for

STEERING_MODES = ("paper", "guarded")
# What a guarded token gets: its without-instruction log-probability, or no more than prompting gives it
# (min of the steered value and l_with: no amplification, the instruction's own pull kept).
GUARD_TARGETS = ("without", "prompt")


@dataclass(frozen=True)
class Steering:
    mode: str = "paper"
    clip: float = 0.0
    plausibility: float = 0.0
    echo_run: int = 0
    guard_to: str = "without"

    def check(self) -> "Steering":
        if self.mode not in STEERING_MODES:
            raise InputError(f"unknown steering {self.mode!r} (choose from {', '.join(STEERING_MODES)})")
        for name in ("clip", "plausibility"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise InputError(f"steering {name} must be a finite number >= 0, got {value!r}")
        if self.plausibility >= 1:
            raise InputError(f"steering plausibility must be < 1, got {self.plausibility!r}")
        if not isinstance(self.echo_run, int) or isinstance(self.echo_run, bool) or not 0 <= self.echo_run <= 64:
            raise InputError(f"steering echo_run must be an integer in [0, 64], got {self.echo_run!r}")
        if self.guard_to not in GUARD_TARGETS:
            raise InputError(f"unknown echo guard target {self.guard_to!r} (choose from {', '.join(GUARD_TARGETS)})")
        if self.mode == "paper" and (self.clip or self.plausibility or self.echo_run):
            raise InputError("the paper's steering has no clip, plausibility or echo_run: use mode 'guarded'")
        return self

    @property
    def is_paper(self) -> bool:
        return self.mode == "paper"

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


PAPER = Steering()


class EchoTracker:
    """Which tokens would extend a run of the instruction's tokens to ``run`` tokens or more.

    ``sources``: token sequences of the instruction (its tokenizations as the answer might copy it).
    ``match[j]``: the length of the longest suffix of the answer so far that equals the ``match[j]`` tokens of
    the instruction just before position j; the token at j then extends it to ``match[j] + 1``."""

    def __init__(self, sources: Iterable[Sequence[int]], run: int):
        seq: List[int] = []
        for s in sources:
            if s:
                seq.extend(int(t) for t in s)
                seq.append(-1)  # a separator no token equals: runs do not cross sources
        self.tokens = np.asarray(seq, dtype=np.int64)
        self.match = np.zeros(len(seq), dtype=np.int64)
        self.run = run

    def guarded(self) -> np.ndarray:
        """Token ids the guard applies to at this step (may repeat)."""
        if self.run <= 0 or self.tokens.size == 0:
            return np.zeros(0, dtype=np.int64)
        ids = self.tokens[(self.match + 1 >= self.run) & (self.tokens >= 0)]
        return ids

    def accept(self, token: int) -> None:
        if self.tokens.size == 0:
            return
        extended = np.zeros_like(self.match)
        hit = self.tokens[:-1] == token
        extended[1:] = np.where(hit, self.match[:-1] + 1, 0)
        self.match = extended


def fuse_steered_numpy(logits_with: np.ndarray, logits_without: np.ndarray, strength: float, steering: Steering,
                       guarded: Optional[np.ndarray] = None, *, k: float, t0: float,
                       temperature_mode: str) -> Tuple[np.ndarray, float, float]:
    """The fusion of ``fusion.fuse_numpy`` with ``steering``'s bounds; ``guarded``: the echo guard's token ids
    at this step. Returns (log_probs float32, temperature, js). The temperature comes from the JS divergence of
    the two raw distributions, as in the paper."""
    log_p, log_q, js = log_probs_and_js(logits_with, logits_without)
    g = k * strength
    with np.errstate(invalid="ignore", over="ignore"):
        d = log_p - log_q
        if steering.clip > 0 and g > 0:
            d = np.clip(d, -steering.clip, steering.clip)
        steered = log_p + g * d
    steered = np.where(np.isneginf(log_q), log_p, steered)
    steered = np.where(np.isneginf(log_p), -np.inf, steered)
    if steering.plausibility > 0 and g > 0:
        steered = np.where(log_p < log_p.max() + math.log(steering.plausibility), -np.inf, steered)
    if guarded is not None and len(guarded) and steering.echo_run > 0 and g > 0:  # a = 0: prompting
        ids = np.unique(guarded)
        if steering.guard_to == "prompt":
            steered[ids] = np.minimum(steered[ids], log_p[ids])
        else:
            steered[ids] = np.where(np.isneginf(steered[ids]), -np.inf, log_q[ids])
    temperature = temperature_for(js, t0, temperature_mode)
    with np.errstate(invalid="ignore"):
        fused = log_softmax(steered / temperature)
    return fused.astype(np.float32), float(temperature), js


# The default of every SDA path (README, "Steering without echo", says why).
DEFAULT_STEERING = Steering("guarded", echo_run=2)
