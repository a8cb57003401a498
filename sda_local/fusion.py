"""SDA fusion (SPEC.md sections 3-4): steering of log-probabilities and divergence-aware temperature.

``fuse`` runs the native implementation (``libsda``) when it is loaded and the numpy/scipy one otherwise.
The numpy implementation is also the test oracle: float64 throughout, with the divergence taken from the
textbook definition (log M = logaddexp(log P, log Q) - ln 2) rather than the C++ code's rearrangement.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from scipy.special import log_softmax

from .errors import InputError

DEFAULT_K = 2.0
DEFAULT_T0 = 0.6
DEFAULT_TOP_P = 0.95
PAPER_SIGMA = 0.01
PAPER_MIN_TEMPERATURE = 0.2

# Same numbering as enum sda_temperature_mode in native/include/sda.h.
TEMPERATURE_MODES = {"paper": 0, "reference": 1, "fixed": 2}


def check_fusion_params(strength: float, k: float, t0: float, temperature_mode: str) -> None:
    """Raise InputError unless the parameters make a valid fusion (finite strength/k >= 0, T0 > 0)."""
    for name, value in (("strength", strength), ("k", k), ("t0", t0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    if strength < 0:
        raise InputError(f"strength must be >= 0 (a negative amplifier reverses the steering), got {strength}")
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    if t0 <= 0:
        raise InputError(f"t0 must be > 0, got {t0}")
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


def fuse_numpy(
    logits_with: np.ndarray,
    logits_without: np.ndarray,
    strength: float,
    *,
    k: float = DEFAULT_K,
    t0: float = DEFAULT_T0,
    temperature_mode: str = "paper",
) -> Tuple[np.ndarray, float, float]:
    """Reference fusion in float64. Returns (log_probs float32, temperature, js)."""
    z_with = np.asarray(logits_with, dtype=np.float64)
    z_without = np.asarray(logits_without, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        log_p = log_softmax(z_with)
        log_q = log_softmax(z_without) if np.isfinite(z_without).any() else np.full_like(z_without, -np.inf)
        p = np.exp(log_p)
        q = np.exp(log_q)
        log_m = np.logaddexp(log_p, log_q) - math.log(2.0)  # log of (P + Q) / 2 without underflow
        js = float(0.5 * np.where(p > 0, p * (log_p - log_m), 0.0).sum()
                   + 0.5 * np.where(q > 0, q * (log_q - log_m), 0.0).sum())
        steered = log_p + (k * strength) * (log_p - log_q)
    # Impossible with the instruction: stays impossible. Impossible only without it: no steering
    # (the difference would be +inf). Same rule as native/src/fusion.cpp.
    steered = np.where(np.isneginf(log_q), log_p, steered)
    steered = np.where(np.isneginf(log_p), -np.inf, steered)
    temperature = temperature_for(max(js, 0.0), t0, temperature_mode)
    with np.errstate(invalid="ignore"):
        fused = log_softmax(steered / temperature)
    return fused.astype(np.float32), float(temperature), max(js, 0.0)


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
    ``"native"`` or ``"numpy"``.
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
