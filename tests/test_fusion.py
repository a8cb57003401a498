"""Native fusion == numpy oracle (1e-5), and the formulas of SPEC.md sections 3-4. No model needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax

from sda_local import InputError, fuse
from sda_local.engine import native
from sda_local.engine.fusion import fuse_numpy, temperature_for

from fusion_cases import MODES, TOL, assert_same, oracle_cases, random_pair


def both(z_with, z_without, strength, **kw):
    return fuse(z_with, z_without, strength, backend="native", **kw), fuse(z_with, z_without, strength, backend="numpy", **kw)


def test_native_library_is_loaded():
    # The installed package must ship libsda: otherwise every "native" test below would be vacuous.
    assert native.library() is not None, native.load_error()


@pytest.mark.parametrize("case", list(oracle_cases()), ids=lambda c: c[0])
def test_native_matches_numpy_on_the_shared_cases(case):
    _, z_with, z_without, strength, kwargs = case
    assert_same(*both(z_with, z_without, strength, **kwargs))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strength", [0.0, 0.05, 0.5, 1.0, 3.0])
def test_native_matches_numpy_on_random_logits(mode, strength):
    rng = np.random.default_rng(int(strength * 100) + len(mode))
    z_with, z_without = random_pair(rng, 49152)
    assert_same(*both(z_with, z_without, strength, temperature_mode=mode))


@pytest.mark.parametrize("spread", [1e-4, 0.05, 2.0, 8.0])
def test_native_matches_numpy_across_divergences(spread):
    rng = np.random.default_rng(7)
    z_with, z_without = random_pair(rng, 32000, spread=spread)
    (_, t, js), expected = both(z_with, z_without, 0.7, k=3.0, t0=0.8)
    assert_same((_, t, js), expected)
    assert 0.0 <= js <= math.log(2) + 1e-6


def test_huge_vocabulary():
    rng = np.random.default_rng(1)
    z_with, z_without = random_pair(rng, 262144)
    for mode in MODES:
        assert_same(*both(z_with, z_without, 0.5, temperature_mode=mode))


def test_large_magnitude_logits():
    rng = np.random.default_rng(2)
    z_with = rng.uniform(-1e4, 1e4, 49152).astype(np.float32)
    z_without = rng.uniform(-1e4, 1e4, 49152).astype(np.float32)
    for mode in MODES:
        assert_same(*both(z_with, z_without, 0.5, temperature_mode=mode))
    # Nearly deterministic distributions that disagree: JS close to ln 2, so paper mode hits its floor.
    _, t, js = fuse(z_with, z_without, 0.5, backend="native")
    assert js > 0.69 and t == pytest.approx(0.2)


def test_negative_infinity_entries():
    rng = np.random.default_rng(3)
    z_with, z_without = random_pair(rng, 4096)
    z_with[:10] = -np.inf  # impossible with the instruction
    z_without[10:20] = -np.inf  # impossible without it
    z_with[20:30] = z_without[20:30] = -np.inf  # impossible in both
    for mode in MODES:
        native_out, numpy_out = both(z_with, z_without, 1.5, temperature_mode=mode)
        assert_same(native_out, numpy_out)
        log_probs = native_out[0]
        assert np.isneginf(log_probs[:10]).all() and np.isneginf(log_probs[20:30]).all()
        assert np.isfinite(log_probs[10:20]).all()  # no +inf, no NaN: such tokens keep their with-log-prob
        assert not np.isnan(log_probs).any()
        assert np.exp(log_probs).sum() == pytest.approx(1.0, abs=1e-4)


def test_identical_streams_equal_prompting_with_the_instruction():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 3, 49152).astype(np.float32)
    for strength in (0.0, 0.5, 2.0):
        log_probs, t, js = fuse(z, z, strength, temperature_mode="paper", backend="native")
        assert js == pytest.approx(0.0, abs=1e-6)
        assert t == pytest.approx(0.6, abs=1e-5)  # JS = 0: T = T0
        np.testing.assert_allclose(log_probs, log_softmax(z.astype(np.float64) / 0.6), **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_zero_strength_is_the_with_instruction_distribution(mode):
    rng = np.random.default_rng(5)
    z_with, z_without = random_pair(rng, 49152, spread=1.5)
    log_probs, t, js = fuse(z_with, z_without, 0.0, temperature_mode=mode, backend="native")
    assert js > 0.01
    np.testing.assert_allclose(log_probs, log_softmax(z_with.astype(np.float64) / t), **TOL)


def test_steering_formula_by_hand():
    z_with = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    z_without = np.array([0.0, 1.0, 2.0, -1.0], dtype=np.float32)
    a, k = 0.5, 2.0
    lw, lwo = log_softmax(z_with.astype(np.float64)), log_softmax(z_without.astype(np.float64))
    p, q = np.exp(lw), np.exp(lwo)
    m = (p + q) / 2
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    t = max(0.2, 0.6 * 0.5 ** (js / 0.01))
    expected = log_softmax((lw + k * a * (lw - lwo)) / t)
    log_probs, t_native, js_native = fuse(z_with, z_without, a, backend="native")
    assert js_native == pytest.approx(js, abs=1e-6)
    assert t_native == pytest.approx(t, abs=1e-6)
    np.testing.assert_allclose(log_probs, expected, atol=1e-5)


def test_temperature_modes():
    assert temperature_for(0.0, 0.6, "paper") == pytest.approx(0.6)
    assert temperature_for(0.01, 0.6, "paper") == pytest.approx(0.3)
    assert temperature_for(0.5, 0.6, "paper") == pytest.approx(0.2)  # floor T_min
    assert temperature_for(math.log(2), 0.6, "reference") == pytest.approx(0.6 * 2**-0.5)
    assert temperature_for(0.3, 0.6, "fixed") == 0.6
    assert temperature_for(0.5, 0.1, "paper") == pytest.approx(0.1)  # never above T0


@pytest.mark.parametrize(
    "kwargs",
    [dict(strength=float("nan")), dict(strength=float("inf")), dict(strength=-0.5), dict(t0=0.0),
     dict(temperature_mode="hot"), dict(k=-1.0)],
)
def test_invalid_parameters_are_rejected(kwargs):
    z = np.zeros(8, dtype=np.float32)
    strength = kwargs.pop("strength", 0.5)
    for backend in ("native", "numpy"):
        with pytest.raises(InputError):
            fuse(z, z, strength, backend=backend, **kwargs)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(InputError):
        fuse(np.zeros(8), np.zeros(9), 0.5)


def test_numpy_oracle_is_independent_of_native_float32_rounding():
    # The oracle works in float64; the native code in float32 with double sums. They agree, but not bit for bit.
    rng = np.random.default_rng(6)
    z_with, z_without = random_pair(rng, 1000)
    lp64, _, _ = fuse_numpy(z_with, z_without, 0.5)
    lp32, _, _ = fuse(z_with, z_without, 0.5, backend="native")
    assert lp64.dtype == np.float32 and lp32.dtype == np.float32
    np.testing.assert_allclose(lp32, lp64, **TOL)


@pytest.mark.parametrize("n", [1, 7, 49152, 262144 + 3])
def test_native_log_sum_exp_matches_scipy(n):
    from scipy.special import logsumexp

    lib = native.library()
    rng = np.random.default_rng(n)
    row = (rng.standard_normal(n) * 5).astype(np.float32)
    row[rng.random(n) < 0.1] = -np.inf  # masked tokens
    row[0] = 3.0  # at least one finite entry
    expected = float(logsumexp(row.astype(np.float64)))
    assert native.log_sum_exp(lib, row) == pytest.approx(expected, rel=1e-6, abs=1e-5)
    shifted = row + np.float32(1e4)  # large magnitudes: the maximum is taken out first
    assert native.log_sum_exp(lib, shifted) == pytest.approx(expected + 1e4, rel=1e-6)


def test_native_log_sum_exp_names_a_faulty_row():
    lib = native.library()
    row = np.zeros(100, np.float32)
    nan_row, inf_row, masked = row.copy(), row.copy(), np.full(100, -np.inf, np.float32)
    nan_row[57], inf_row[3] = np.nan, np.inf
    assert math.isnan(native.log_sum_exp(lib, nan_row))
    assert native.log_sum_exp(lib, inf_row) == math.inf
    assert native.log_sum_exp(lib, masked) == -math.inf
    # No finite entry to take the maximum from: NaNs must still show (a broken model's row is all NaN).
    assert math.isnan(native.log_sum_exp(lib, np.full(100, np.nan, np.float32)))
    masked_nan = masked.copy()
    masked_nan[99] = np.nan
    assert math.isnan(native.log_sum_exp(lib, masked_nan))
    both_faults = inf_row.copy()
    both_faults[10] = np.nan
    assert native.log_sum_exp(lib, both_faults) == math.inf
    # Not a float32 row: converted, never read as raw memory.
    assert native.log_sum_exp(lib, np.zeros(8)) == pytest.approx(math.log(8))
    assert native.log_sum_exp(lib, np.zeros((8, 2), np.float32)[:, 0]) == pytest.approx(math.log(8))
