"""The native nucleus sampler (top-p and the seeded draw without sorting the vocabulary) against llama.cpp's
own top-p: the same kept set on real and synthetic rows, draws by probability, seeded reproducibility."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from sda_local import fuse
from sda_local.engine import native
from sda_local.engine.llama import TOKEN_DATA

lib = native.library()
pytestmark = pytest.mark.skipif(lib is None, reason="libsda is not loaded")


def candidates(logits: np.ndarray):
    cand = np.zeros(len(logits), dtype=TOKEN_DATA)
    cand["id"] = np.arange(len(logits), dtype=np.int32)
    cand["logit"] = logits
    arr = llama_cpp.llama_token_data_array(data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(logits),
                                           selected=-1, sorted=False)
    return cand, arr


def apply(sampler, logits):
    cand, arr = candidates(np.asarray(logits, dtype=np.float32))
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
    kept = cand[: arr.size]
    return kept["id"].tolist(), kept["p"].copy(), arr.selected


def llama_top_p(logits, p):
    sampler = llama_cpp.llama_sampler_init_top_p(p, 1)
    try:
        ids, _, _ = apply(sampler, logits)
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return ids


def nucleus(logits, p, seed=1, temperature=1.0):
    sampler = ctypes.cast(native.nucleus_sampler_init(lib, p, seed, temperature), llama_cpp.llama_sampler_p_ctypes)
    try:
        return apply(sampler, logits)
    finally:
        llama_cpp.llama_sampler_free(sampler)


def rows(engine):
    """Real rows: the model's raw logits at several temperatures, and SDA's fused rows."""
    out = []
    for query, align in [("How do I fix a flat bike tyre?", "helpfulness"), ("Is the earth flat?", "honesty"),
                         ("Write a poem about rain.", "Answer in one short sentence.")]:
        z_with, z_without = engine.logits(query, align)
        for t in (0.2, 0.6, 1.0, 2.0):
            out.append(z_with / t)
        for a in (0.0, 0.5, 2.0):
            out.append(fuse(z_with, z_without, a)[0])
    return out


def synthetic():
    rng = np.random.default_rng(0)
    flat = np.zeros(1000, dtype=np.float32)
    masked = rng.normal(size=5000).astype(np.float32)
    masked[::3] = -np.inf
    big = (rng.standard_normal(262_144) * 3).astype(np.float32)
    huge = rng.uniform(-1e4, 1e4, size=4096).astype(np.float32)
    ties = np.repeat(np.array([5.0, 4.0, 3.0], dtype=np.float32), 7)
    return [flat, masked, big, huge, ties, np.array([3.0], dtype=np.float32)]


def exact_mass(row, ids):
    z = np.asarray(row, dtype=np.float64)
    w = np.exp(z - z.max())
    return float(w[ids].sum() / w.sum())


def float32_top_p_count(row, p32):
    """How many tokens a top-p computed as llama.cpp does keeps: float32 probabilities normalised by a
    sequential float32 sum, then a float32 running sum in decreasing order."""
    z = np.asarray(row, dtype=np.float32)
    w = np.exp(z - z.max())
    total = np.cumsum(w, dtype=np.float32)[-1]
    running = np.cumsum(np.sort(w / total)[::-1], dtype=np.float32)
    reached = np.nonzero(running >= p32)[0]
    return int(reached[0]) + 1 if len(reached) else len(z)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.95, 0.999])
def test_the_kept_set_is_the_exact_nucleus_and_llama_cpps_up_to_its_float_sums(engine, p):
    """The nucleus keeps the exact top-p set (checked in float64): the most probable tokens until their mass
    reaches p. llama.cpp's top-p keeps the same tokens in the same order, except where its float32 sums
    (over up to 262,144 probabilities) move the cut: then a float32 emulation of its arithmetic puts the cut
    where llama.cpp does."""
    p32 = float(np.float32(p))  # what the samplers receive
    for row in rows(engine) + synthetic():
        ours, probs, _ = nucleus(row, p)
        theirs = llama_top_p(row, p)
        values = np.asarray(row)
        assert abs(float(probs.sum()) - 1.0) < 1e-5 and np.all(np.diff(probs) <= 1e-7)
        assert len(set(ours)) == len(ours)
        assert exact_mass(row, ours[:-1]) < p32 <= exact_mass(row, ours) + 1e-12  # minimal, and enough
        common = min(len(ours), len(theirs))
        if len(set(values[theirs].tolist())) == len(theirs):  # no ties: the very same order
            assert ours[:common] == theirs[:common]
        else:
            assert sorted(values[ours[:common]]) == sorted(values[theirs[:common]])
        if len(ours) != len(theirs):
            assert abs(len(theirs) - float32_top_p_count(row, p32)) <= 1, (len(ours), len(theirs))


def test_top_p_one_keeps_every_possible_token():
    row = np.array([1.0, -np.inf, 0.5, -np.inf, -3.0], dtype=np.float32)
    ids, probs, selected = nucleus(row, 1.0)
    assert sorted(ids) == [0, 2, 4] and 0 <= selected < 3


def test_draws_follow_the_probabilities_and_reproduce_with_the_seed():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    counts = np.zeros(4)
    picks = []
    sampler = ctypes.cast(native.nucleus_sampler_init(lib, 0.99, 42), llama_cpp.llama_sampler_p_ctypes)
    try:
        for _ in range(4000):
            ids, _, selected = apply(sampler, logits)
            picks.append(ids[selected])
            counts[ids[selected]] += 1
        llama_cpp.llama_sampler_reset(sampler)
        again = []
        for _ in range(50):
            ids, _, selected = apply(sampler, logits)
            again.append(ids[selected])
    finally:
        llama_cpp.llama_sampler_free(sampler)
    assert again == picks[:50]
    assert np.all(np.abs(counts / counts.sum() - [0.5, 0.3, 0.15, 0.05]) < 0.03)
    assert [nucleus(logits, 0.99, seed=7)[2] for _ in range(5)] == [nucleus(logits, 0.99, seed=7)[2]] * 5


def test_a_single_refused_candidate_passes_through():
    # What the SDA and guard samplers leave after a non-finite row: one candidate with id -1.
    cand = np.zeros(1, dtype=TOKEN_DATA)
    cand["id"] = -1
    arr = llama_cpp.llama_token_data_array(data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=1,
                                           selected=-1, sorted=True)
    sampler = ctypes.cast(native.nucleus_sampler_init(lib, 0.95, 1), llama_cpp.llama_sampler_p_ctypes)
    try:
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
    finally:
        llama_cpp.llama_sampler_free(sampler)
    assert arr.size == 1 and arr.selected == 0 and cand[0]["id"] == -1


def test_invalid_top_p_and_temperature_are_refused():
    for p in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            native.nucleus_sampler_init(lib, p, 1)
        with pytest.raises(ValueError):
            native.nucleus_sampler_init(lib, 0.95, 1, temperature=p)


@pytest.mark.parametrize("temperature", [0.2, 0.6, 1.7])
def test_its_temperature_is_llama_cpps_temp_sampler(engine, temperature):
    # The plain chain is [guard, nucleus(T0)] in place of [guard, temp(T0), nucleus(1)]: the same division of
    # every logit, so the same kept candidates, probabilities and draws.
    z_with, _ = engine.logits("Write a poem about rain.", "Answer in one short sentence.")
    for seed in range(5):
        ids, probs, selected = nucleus(z_with, 0.95, seed=seed, temperature=temperature)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        llama_cpp.llama_sampler_chain_add(chain, ctypes.cast(native.nucleus_sampler_init(lib, 0.95, seed),
                                                             llama_cpp.llama_sampler_p_ctypes))
        try:
            ref_ids, ref_probs, ref_selected = apply(chain, z_with)
        finally:
            llama_cpp.llama_sampler_free(chain)
        assert ids == ref_ids and selected == ref_selected
        np.testing.assert_array_equal(probs, ref_probs)
