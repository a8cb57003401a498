"""The SDA sampler reading both rows in place (sda_sampler_set_rows) against the same sampler reading cur_p
(sda_sampler_set_source only): bit-identical fused logits on real rows, and a cur_p that is not the row (a
sampler before ours changed a logit, reordered or truncated it) detected and fused from cur_p instead."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest
from scipy.special import log_softmax

from sda_local import fuse
from sda_local.engine import native
from sda_local.engine.llama import TOKEN_DATA
from sda_local.models.gguf import GGUFModel

lib = native.library()
pytestmark = pytest.mark.skipif(lib is None, reason="libsda is not loaded")
STRENGTH = 0.5


@pytest.fixture(scope="module")
def rows(model_path):
    """A real context holding two output rows (the last two prompt positions): (ctx, n_vocab)."""
    model = GGUFModel(model_path)
    ctx = model.new_context(n_ctx=256, n_batch=64, n_ubatch=32, n_threads=2)
    tokens = model.tokenize("The quick brown fox jumps over the lazy dog because", add_bos=True)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i >= len(tokens) - 2
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        yield ctx, model.n_vocab, len(tokens)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        model.close()


def row(ctx, idx, n_vocab):
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(n_vocab,)).copy()


def apply_sda(ctx, n_vocab, cand, *, in_place):
    """Apply one SDA sampler to the candidates `cand` (fused in place); returns its stats."""
    params = native.make_params(STRENGTH, 2.0, 0.6, 0)
    sampler = native.sampler_init(lib, params, n_vocab, None, -1)
    if in_place:
        lib.sda_sampler_set_rows(sampler, ctx, -2, ctx, -1)
    else:
        lib.sda_sampler_set_source(sampler, ctx, -1)
    arr = llama_cpp.llama_token_data_array(data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(cand),
                                           selected=-1, sorted=False)
    smpl = ctypes.cast(sampler, llama_cpp.llama_sampler_p_ctypes)
    try:
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return native.sampler_stats(lib, sampler)
    finally:
        llama_cpp.llama_sampler_free(smpl)


def candidates(logits):
    cand = np.zeros(len(logits), dtype=TOKEN_DATA)
    cand["id"] = np.arange(len(logits), dtype=np.int32)
    cand["logit"] = logits
    return cand


def test_in_place_equals_reading_cur_p_and_the_numpy_fusion(rows):
    ctx, n_vocab, _ = rows
    z_with, z_without = row(ctx, -2, n_vocab), row(ctx, -1, n_vocab)
    direct, gathered = candidates(z_with), candidates(z_with)
    stats = apply_sda(ctx, n_vocab, direct, in_place=True)
    assert (stats.n_steps, stats.n_in_place) == (1, 1)
    stats = apply_sda(ctx, n_vocab, gathered, in_place=False)
    assert (stats.n_steps, stats.n_in_place) == (1, 0)
    np.testing.assert_array_equal(direct["logit"], gathered["logit"])
    np.testing.assert_array_equal(direct["id"], np.arange(n_vocab))
    expected, t, _ = fuse(z_with, z_without, STRENGTH, backend="numpy")
    assert stats.last_temperature == pytest.approx(t, abs=1e-5)
    np.testing.assert_allclose(log_softmax(direct["logit"].astype(np.float64)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["last logit", "first logit", "swapped ids", "truncated"])
def test_a_cur_p_that_is_not_the_row_is_fused_from_cur_p(rows, change):
    ctx, n_vocab, _ = rows
    z_with = row(ctx, -2, n_vocab)
    cand = candidates(z_with)
    if change == "last logit":  # found in the last block, after every other block was written: undone
        cand["logit"][-1] += 1.0
    elif change == "first logit":
        cand["logit"][0] -= 1.0
    elif change == "swapped ids":
        cand[[3, 700]] = cand[[700, 3]]
    else:
        cand = cand[:-5].copy()
    reference = cand.copy()
    stats = apply_sda(ctx, n_vocab, cand, in_place=True)
    assert (stats.n_steps, stats.n_in_place) == (1, 0)
    apply_sda(ctx, n_vocab, reference, in_place=False)
    np.testing.assert_array_equal(cand["id"], reference["id"])
    np.testing.assert_array_equal(cand["logit"], reference["logit"])


def test_every_step_of_a_generation_reads_the_rows_in_place(engine):
    # The engine's chains put the SDA sampler first and sample with llama_sampler_sample on the with-row.
    stream = engine.stream("Name a colour.", "Answer in one word.", strength=0.5, max_tokens=6, seed=1,
                           ignore_eos=True)
    list(stream)
    stats = stream.result.stats
    assert stats.fusion_us_per_token is not None and stats.fusion_steps_in_place == 6
    assert stats.sampling_us_per_token > stats.fusion_us_per_token
