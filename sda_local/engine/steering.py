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
  DRY sampler finds repeats: one match length per instruction position, advanced with each accepted token;
* ``parts``: the instruction is read into the text it asks for, the words it forbids and its directive
  (instruction.py): asked text is never guarded, a forbidden word gets at most min(l_with, l_without), and with
  ``cap`` the directive's words are never amplified beyond prompting, min(l, l_with);
* ``onset`` N > 0: the first N tokens of the answer are not steered (prompting with the instruction), so the
  answer starts on the query's subject before the contrast shapes it.

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
    parts: bool = False
    cap: bool = False
    onset: int = 0

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
        for name in ("parts", "cap"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"steering {name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.onset, int) or isinstance(self.onset, bool) or not 0 <= self.onset <= 4096:
            raise InputError(f"steering onset must be an integer in [0, 4096], got {self.onset!r}")
        if self.cap and not self.parts:
            raise InputError("steering cap needs parts (the directive's words are read from the instruction's parts)")
        if self.mode == "paper" and (self.clip or self.plausibility or self.echo_run or self.parts or self.onset):
            raise InputError("the paper's steering has no clip, plausibility, echo_run, parts, cap or onset: use mode "
                             "'guarded'")
        return self

    @property
    def reads_instruction(self) -> bool:
        """Whether a generation needs the instruction's tokens (the echo guard or its parts)."""
        return self.echo_run > 0 or self.parts

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

    def __init__(self, sources: Iterable[Sequence[int]], run: int, run_at: Optional[Sequence[int]] = None):
        seq: List[int] = []
        for s in sources:
            if s:
                seq.extend(int(t) for t in s)
                seq.append(-1)  # a separator no token equals: runs do not cross sources
        self.tokens = np.asarray(seq, dtype=np.int64)
        self.match = np.zeros(len(seq), dtype=np.int64)
        self.run = run
        # The run length at which each position is guarded (0: never); ``run`` everywhere by default.
        if run_at is None:
            self.run_at = np.where(self.tokens >= 0, run, 0).astype(np.int64)
        else:
            self.run_at = np.asarray(run_at, dtype=np.int64)
            if self.run_at.shape != self.tokens.shape:
                raise ValueError("run_at must have one entry per token of the sources and separator")

    @classmethod
    def of(cls, guard, run: int) -> "EchoTracker":
        """The tracker of an instruction.InstructionGuard."""
        return cls(guard.sources, run, guard.run_at or None)

    def guarded(self) -> np.ndarray:
        """Token ids the guard applies to at this step (may repeat)."""
        if self.run <= 0 or self.tokens.size == 0:
            return np.zeros(0, dtype=np.int64)
        ids = self.tokens[(self.run_at > 0) & (self.match + 1 >= self.run_at) & (self.tokens >= 0)]
        return ids

    def accept(self, token: int) -> None:
        if self.tokens.size == 0:
            return
        extended = np.zeros_like(self.match)
        hit = self.tokens[:-1] == token
        extended[1:] = np.where(hit, self.match[:-1] + 1, 0)
        self.match = extended


def fuse_steered_numpy(logits_with: np.ndarray, logits_without: np.ndarray, strength: float, steering: Steering,
                       guarded: Optional[np.ndarray] = None, *, k: float, t0: float, temperature_mode: str,
                       capped: Sequence[int] = (), forbidden: Sequence[int] = ()) -> Tuple[np.ndarray, float, float]:
    """The fusion of ``fusion.fuse_numpy`` with ``steering``'s bounds; ``guarded``: the echo guard's token ids
    at this step; ``capped``: ids never amplified beyond prompting, min(l, l_with); ``forbidden``: ids held to
    at most min(l_with, l_without) (instruction.InstructionGuard; applied in that order: capped, guarded, forbidden).
    Returns (log_probs float32, temperature, js). The temperature comes from the JS divergence of the two raw
    distributions, as in the paper."""
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
    if len(capped) and g > 0:
        ids = np.unique(np.asarray(capped, dtype=np.int64))
        steered[ids] = np.minimum(steered[ids], log_p[ids])
    if guarded is not None and len(guarded) and g > 0 and steering.echo_run > 0:  # a = 0: prompting
        ids = np.unique(guarded)
        if steering.guard_to == "prompt":
            steered[ids] = np.minimum(steered[ids], log_p[ids])
        else:
            steered[ids] = np.where(np.isneginf(steered[ids]), -np.inf, log_q[ids])
    if len(forbidden) and g > 0:
        ids = np.unique(np.asarray(forbidden, dtype=np.int64))
        steered[ids] = np.minimum(steered[ids], np.minimum(log_p[ids], log_q[ids]))
    temperature = temperature_for(js, t0, temperature_mode)
    with np.errstate(invalid="ignore"):
        fused = log_softmax(steered / temperature)
    return fused.astype(np.float32), float(temperature), js


# The default of every SDA path (README, "Steering without echo", says why).
DEFAULT_STEERING = Steering("guarded", echo_run=2, parts=True, cap=True, onset=8)
