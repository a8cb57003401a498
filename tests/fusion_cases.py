"""Shared by the fusion tests: the comparison with the numpy oracle, and the cases every build must pass."""

from __future__ import annotations

import numpy as np

TOL = dict(rtol=1e-5, atol=1e-5)
MODES = ("paper", "reference", "fixed")


def assert_same(a, b):
    """(log_probs, T, JS) from two backends: equal to 1e-5, with the same -inf entries."""
    (lp_a, t_a, js_a), (lp_b, t_b, js_b) = a, b
    assert abs(t_a - t_b) <= 1e-5, (t_a, t_b)
    assert abs(js_a - js_b) <= 1e-5, (js_a, js_b)
    finite = np.isfinite(lp_b)
    np.testing.assert_array_equal(np.isfinite(lp_a), finite)
    np.testing.assert_array_equal(np.isneginf(lp_a), np.isneginf(lp_b))
    np.testing.assert_allclose(lp_a[finite], lp_b[finite], **TOL)
    np.testing.assert_allclose(np.exp(lp_a), np.exp(lp_b), rtol=0, atol=1e-5)


def copy_and_discouraged_rows(n=50):
    """Rows where token 3 is the copy (likely with the instruction, unlikely without) and token 4 one the
    instruction discourages; every other token is neutral."""
    z_with = np.zeros(n, dtype=np.float32)
    z_without = np.zeros(n, dtype=np.float32)
    z_with[3], z_without[3] = 4.0, -4.0
    z_with[4], z_without[4] = -3.0, 1.0
    return z_with, z_without


def random_pair(rng, n, scale=3.0, spread=0.7):
    z_with = rng.normal(0.0, scale, n).astype(np.float32)
    z_without = (z_with + rng.normal(0.0, spread, n)).astype(np.float32)
    return z_with, z_without


def oracle_cases():
    """(name, z_with, z_without, strength, keyword arguments): random rows of the sizes of real vocabularies
    and odd sizes (partial SIMD packs and blocks), masked tokens, logits of magnitude 1e4, identical rows."""
    rng = np.random.default_rng(11)
    for n in (1, 7, 4099, 49152, 262144):
        z_with, z_without = random_pair(rng, n)
        for mode in MODES:
            yield f"random-{n}-{mode}", z_with, z_without, 0.5, dict(temperature_mode=mode)
    z_with, z_without = random_pair(rng, 32000, spread=8.0)
    yield "far-apart", z_with, z_without, 0.7, dict(k=3.0, t0=0.8)
    z_with, z_without = random_pair(rng, 5000)
    z_with[:10] = -np.inf
    z_without[600:700] = -np.inf
    z_with[1030:1040] = z_without[1030:1040] = -np.inf
    yield "masked", z_with, z_without, 1.5, {}
    yield "masked-zero-strength", z_with, z_without, 0.0, {}
    huge_with = rng.uniform(-1e4, 1e4, 49152).astype(np.float32)
    huge_without = rng.uniform(-1e4, 1e4, 49152).astype(np.float32)
    yield "magnitude-1e4", huge_with, huge_without, 0.5, {}
    z = rng.normal(0, 3, 49152).astype(np.float32)
    yield "identical", z, z.copy(), 2.0, {}
