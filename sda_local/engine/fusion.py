"""SDA fusion (SPEC.md sections 3-4): steering of log-probabilities and divergence-aware temperature.

``fuse`` runs the native implementation (``libsda``) when it is loaded and the numpy/scipy one otherwise.
The numpy implementation is also the test oracle: float64 throughout, with the divergence taken from the
textbook definition (log M = logaddexp(log P, log Q) - ln 2) rather than the C++ code's rearrangement.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import numpy as np
from scipy.special import log_softmax

from ..errors import InputError, ModelError

DEFAULT_K = 2.0
DEFAULT_T0 = 0.6
DEFAULT_TOP_P = 0.95
PAPER_SIGMA = 0.01
PAPER_MIN_TEMPERATURE = 0.2

# Same numbering as enum sda_temperature_mode in native/include/sda.h.
TEMPERATURE_MODES = {"paper": 0, "reference": 1, "fixed": 2}
# The default of every SDA path: T0 throughout. The paper's divergence-aware temperature stays available
# ("paper"); on the development set it doubled the share of looping answers (README, "Steering without echo").
DEFAULT_TEMPERATURE_MODE = "fixed"

ROW_NAMES = {"with": "with-instruction", "without": "without-instruction"}


class NonFiniteLogitsError(ModelError):
    """A logit row holds a NaN or +inf (fp16 overflow on GPU builds can produce them); -inf is legal.
    ``value`` is "NaN" or "+inf", ``row`` "with" or "without"."""

    def __init__(self, value: str, row: str, message: Optional[str] = None):
        self.value, self.row = value, row
        super().__init__(message or f"non-finite logits ({value}) in the {ROW_NAMES[row]} row")


def generation_stopped(value: str, row: Optional[str], step: int) -> NonFiniteLogitsError:
    """The one-line error of a generation that met non-finite logits at (1-based) sampling step ``step``;
    ``row`` None for plain generation."""
    where = f"of the {ROW_NAMES[row]} stream" if row else "(plain generation)"
    return NonFiniteLogitsError(
        value, row or "with",
        f"the model produced non-finite logits ({value}) at step {step} {where}; generation stopped",
    )


def nonfinite_value(z: np.ndarray) -> Optional[str]:
    """The fault of a row, "NaN" or "+inf", or None (finite and -inf entries only). One max pass: NumPy's
    max propagates NaN, and +inf is the max otherwise."""
    top = z.max()
    if top < np.inf:
        return None
    return "NaN" if np.isnan(top) else "+inf"


class LogitInjection(NamedTuple):
    """TEST ONLY: see ``logit_injection_from_env``."""

    value: str  # "nan", "+inf" or "-inf"
    step: int  # 1-based sampling step
    row: str  # "with" or "without"
    seed: Optional[int]  # only generations with this seed; None: every generation


TEST_INJECTION_ENV = "SDA_LOCAL_TEST_INJECT_LOGITS"
INJECTION_VALUES = {"nan": 1, "+inf": 2, "inf": 2, "-inf": 3}  # enum sda_fault_value in native/include/sda.h


def logit_injection_from_env() -> Tuple[LogitInjection, ...]:
    """TEST ONLY. ``SDA_LOCAL_TEST_INJECT_LOGITS=VALUE@STEP[:with|:without][:seed=N][,...]`` (e.g. ``nan@3``,
    ``+inf@2:without``, ``nan@1:seed=7,+inf@4:without:seed=8``) makes a generation overwrite one logit of
    the chosen row (default: with) with VALUE (nan, +inf or -inf) at sampling step STEP, before the
    non-finite checks, in the native samplers and in the numpy paths alike, so that tests reach the
    non-finite path with a real model. A spec with a seed applies only to generations with that seed; the
    first spec that applies wins. Plain generation has only the with-row. The engine reads the variable
    once, at its first generation; unset, it costs nothing. Not a user setting.
    """
    spec_list = os.environ.get(TEST_INJECTION_ENV, "").strip()
    return tuple(_parse_injection(spec) for spec in spec_list.split(",")) if spec_list else ()


def _parse_injection(spec: str) -> LogitInjection:
    try:
        head, *options = spec.strip().split(":")
        value, step_text = head.split("@")
        value, step = value.strip().lower(), int(step_text)
        row, seed = "with", None
        for option in options:
            option = option.strip()
            if option in ("with", "without"):
                row = option
            elif option.startswith("seed="):
                seed = int(option[5:])
            else:
                raise ValueError(option)
        if value not in INJECTION_VALUES or step < 1:
            raise ValueError(value)
    except ValueError:
        raise InputError(f"{TEST_INJECTION_ENV}: bad entry {spec!r}, expected VALUE@STEP[:with|:without][:seed=N] "
                         f"with VALUE nan, +inf or -inf and STEP >= 1 (a test-only setting)") from None
    return LogitInjection("+inf" if value == "inf" else value, step, row, seed)


# Ranges that keep the fusion's float arithmetic finite and the result meaningful: the paper's a is in
# [0, 1] and k = 2; beyond a of 100 the steering term swamps the model entirely; a temperature under 0.001
# makes 1/T overflow float32 once multiplied by logit gaps; a nucleus under 0.001 is greedy decoding.
MAX_STRENGTH = 100.0
MAX_K = 100.0
MIN_T0, MAX_T0 = 1e-3, 100.0
MIN_TOP_P = 1e-3


def check_fusion_params(strength: float, k: float, t0: float, temperature_mode: str) -> None:
    """Raise InputError unless the parameters make a valid fusion: 0 <= strength <= MAX_STRENGTH,
    0 <= k <= MAX_K, MIN_T0 <= T0 <= MAX_T0."""
    for name, value in (("strength", strength), ("k", k), ("t0", t0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    if strength < 0:
        raise InputError(f"strength must be >= 0 (a negative amplifier reverses the steering), got {strength}")
    if strength > MAX_STRENGTH:
        raise InputError(f"strength must be <= {MAX_STRENGTH:g} (the paper's amplifier is in [0, 1]), got {strength:g}")
    if not 0 <= k <= MAX_K:
        raise InputError(f"k must be in [0, {MAX_K:g}], got {k:g}")
    if not MIN_T0 <= t0 <= MAX_T0:
        raise InputError(f"t0 must be in [{MIN_T0:g}, {MAX_T0:g}], got {t0:g}")
    if temperature_mode not in TEMPERATURE_MODES:
        raise InputError(
            f"unknown temperature mode {temperature_mode!r} (choose from {', '.join(TEMPERATURE_MODES)})"
        )


def temperature_for(js: float, t0: float, temperature_mode: str) -> float:
    """Temperature of SPEC.md section 4 for a JS divergence ``js`` (nats)."""
    if temperature_mode == "paper":
        return max(min(PAPER_MIN_TEMPERATURE, t0), t0 * 0.5 ** (js / PAPER_SIGMA))
    if temperature_mode == "reference":
        return t0 * 0.5 ** (js / (2.0 * math.log(2.0)))
    return t0


def log_probs_and_js(logits_with, logits_without) -> Tuple[np.ndarray, np.ndarray, float]:
    """(log P, log Q, JS) of two raw rows in float64: the part of the reference fusion every steering shares.
    Raises NonFiniteLogitsError when a row holds a NaN or +inf."""
    z_with = np.asarray(logits_with, dtype=np.float64)
    z_without = np.asarray(logits_without, dtype=np.float64)
    for row, z in (("with", z_with), ("without", z_without)):
        value = nonfinite_value(z)
        if value is not None:
            raise NonFiniteLogitsError(value, row)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        log_p = log_softmax(z_with)
        log_q = log_softmax(z_without) if np.isfinite(z_without).any() else np.full_like(z_without, -np.inf)
        p = np.exp(log_p)
        q = np.exp(log_q)
        log_m = np.logaddexp(log_p, log_q) - math.log(2.0)  # log of (P + Q) / 2 without underflow
        js = float(0.5 * np.where(p > 0, p * (log_p - log_m), 0.0).sum()
                   + 0.5 * np.where(q > 0, q * (log_q - log_m), 0.0).sum())
    return log_p, log_q, max(js, 0.0)


def fuse_numpy(
    logits_with: np.ndarray,
    logits_without: np.ndarray,
    strength: float,
    *,
    k: float = DEFAULT_K,
    t0: float = DEFAULT_T0,
    temperature_mode: str = "paper",
) -> Tuple[np.ndarray, float, float]:
    """Reference fusion in float64. Returns (log_probs float32, temperature, js). Raises
    NonFiniteLogitsError when a row holds a NaN or +inf (-inf entries are masked tokens)."""
    log_p, log_q, js = log_probs_and_js(logits_with, logits_without)
    with np.errstate(invalid="ignore", over="ignore"):
        steered = log_p + (k * strength) * (log_p - log_q)
    # Impossible with the instruction: stays impossible. Impossible only without it: no steering
    # (the difference would be +inf). Same rule as native/src/fusion.cpp.
    steered = np.where(np.isneginf(log_q), log_p, steered)
    steered = np.where(np.isneginf(log_p), -np.inf, steered)
    temperature = temperature_for(js, t0, temperature_mode)
    with np.errstate(invalid="ignore"):
        fused = log_softmax(steered / temperature)
    return fused.astype(np.float32), float(temperature), js


def fuse(
    logits_with,
    logits_without,
    strength: float,
    *,
    k: float = DEFAULT_K,
    t0: float = DEFAULT_T0,
    temperature_mode: str = "paper",
    backend: str = "auto",
) -> Tuple[np.ndarray, float, float]:
    """Fuse two raw logit rows as SDA does at every decoding step.

    Returns ``(log_probs, temperature, js)``: the normalised fused log-probabilities after temperature
    (float32 numpy array of length n_vocab), the temperature used and the Jensen-Shannon divergence
    (nats) between the two streams' distributions. ``backend`` is ``"auto"`` (native when loaded),
    ``"native"`` or ``"numpy"``. A NaN or +inf in either row raises NonFiniteLogitsError (a ModelError).
    """
    check_fusion_params(strength, k, t0, temperature_mode)
    z_with = np.ascontiguousarray(logits_with, dtype=np.float32)
    z_without = np.ascontiguousarray(logits_without, dtype=np.float32)
    if z_with.ndim != 1 or z_with.shape != z_without.shape or z_with.size == 0:
        raise InputError(
            f"logits must be two non-empty 1-D arrays of equal length, got {z_with.shape} and {z_without.shape}"
        )
    if backend not in ("auto", "native", "numpy"):
        raise InputError(f"unknown fusion backend {backend!r} (choose from auto, native, numpy)")
    if backend != "numpy":
        from . import native

        lib = native.library()
        if lib is not None:
            return native.fuse(lib, z_with, z_without, strength, k, t0, TEMPERATURE_MODES[temperature_mode])
        if backend == "native":
            raise InputError(f"the native fusion library is not loaded: {native.load_error()}")
    return fuse_numpy(z_with, z_without, strength, k=k, t0=t0, temperature_mode=temperature_mode)
