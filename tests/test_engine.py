"""SDAEngine on the real default model: fusion on real logits, the a = 0 identity, streams, stats, errors."""

from __future__ import annotations

import numpy as np
import pytest

from sda_local import ContextOverflowError, InputError, ModelError, SDAEngine, fuse
from sda_local.prompts import PRESETS

from conftest import TEST_CACHE_TYPE

QUERY = "How do I fix a flat bike tyre?"


def test_native_matches_numpy_on_real_model_logits(engine):
    for query, align in [(QUERY, "helpfulness"), ("Is it safe to eat raw cookie dough?", "honesty")]:
        z_with, z_without = engine.logits(query, align)
        assert z_with.shape == (engine.model.n_vocab,) and not np.array_equal(z_with, z_without)
        for mode in ("paper", "reference", "fixed"):
            lp_n, t_n, js_n = fuse(z_with, z_without, 0.5, temperature_mode=mode, backend="native")
            lp_p, t_p, js_p = fuse(z_with, z_without, 0.5, temperature_mode=mode, backend="numpy")
            assert abs(t_n - t_p) <= 1e-5 and abs(js_n - js_p) <= 1e-5
            np.testing.assert_allclose(lp_n, lp_p, rtol=1e-5, atol=1e-5)
            assert js_n > 0  # the instruction changes the next-token distribution


def test_batched_and_contexts_streams_see_the_same_logits(engine, engine_contexts):
    # Shared-prefix reuse and two-sequence batches change nothing: the logits are bit-identical.
    a_with, a_without = engine.logits(QUERY, "empathy")
    b_with, b_without = engine_contexts.logits(QUERY, "empathy")
    np.testing.assert_array_equal(a_with, b_with)
    np.testing.assert_array_equal(a_without, b_without)


@pytest.mark.parametrize("fixture", ["engine", "engine_contexts"])
def test_zero_strength_fixed_temperature_is_plain_prompting_with_the_instruction(fixture, request):
    eng = request.getfixturevalue(fixture)
    preset = PRESETS["helpfulness"]
    for seed in (1, 2):
        sda = eng.generate(QUERY, "helpfulness", strength=0.0, temperature_mode="fixed", seed=seed, max_tokens=64)
        plain = eng.generate(f"{QUERY}\n{preset.instruction}", None, system=preset.system, seed=seed, max_tokens=64)
        assert sda.stats.mode == "sda" and plain.stats.mode == "plain"
        assert sda.prompt_with == plain.prompt_with
        assert sda.tokens == plain.tokens
        assert sda.text == plain.text


def test_native_sampler_and_numpy_fallback_sample_the_same_tokens(model_path, engine):
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2, fusion_backend="numpy", cache_type_k=TEST_CACHE_TYPE,
                   cache_type_v=TEST_CACHE_TYPE) as fallback:
        for seed in (3, 4):
            a = engine.generate(QUERY, "helpfulness", strength=0.5, seed=seed, max_tokens=40)
            b = fallback.generate(QUERY, "helpfulness", strength=0.5, seed=seed, max_tokens=40)
            assert a.stats.fusion_backend == "native" and b.stats.fusion_backend == "numpy"
            assert a.tokens == b.tokens
            assert a.stats.mean_js == pytest.approx(b.stats.mean_js, abs=1e-4)
            assert a.stats.mean_temperature == pytest.approx(b.stats.mean_temperature, abs=1e-4)


def test_same_seed_same_answer_different_seed_different_answer(engine):
    a = engine.generate(QUERY, "helpfulness", seed=11, max_tokens=48)
    b = engine.generate(QUERY, "helpfulness", seed=11, max_tokens=48)
    c = engine.generate(QUERY, "helpfulness", seed=12, max_tokens=48)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_strength_changes_the_answer(engine):
    weak = engine.generate(QUERY, "Answer entirely in French.", strength=0.0, seed=5, max_tokens=32)
    strong = engine.generate(QUERY, "Answer entirely in French.", strength=1.0, seed=5, max_tokens=32)
    assert weak.tokens != strong.tokens
    assert strong.stats.mean_js > 0


def test_stats_of_a_steered_generation(engine):
    r = engine.generate(QUERY, "helpfulness", strength=0.5, seed=1, max_tokens=24, ignore_eos=True)
    s = r.stats
    assert s.mode == "sda" and s.streams == "batched" and s.fusion_backend == "native"
    assert s.generated_tokens == len(r.tokens) == 24 and s.finish_reason == "length"
    assert s.prompt_tokens_with > s.prompt_tokens_without > s.shared_prefix_tokens > 0
    assert 0 < s.mean_js < 0.7 and s.mean_temperature == pytest.approx(0.6)  # the default: fixed at T0
    from sda_local.engine.steering import DEFAULT_STEERING

    assert s.steering == DEFAULT_STEERING.to_dict() and s.steering["mode"] == "guarded"
    assert set(s.steering) == {"mode", "clip", "plausibility", "echo_run", "guard_to", "parts", "cap", "onset"}
    paper = engine.generate(QUERY, "helpfulness", strength=0.5, seed=1, max_tokens=24, ignore_eos=True,
                            temperature_mode="paper").stats
    assert 0.2 - 1e-6 <= paper.mean_temperature <= 0.6 + 1e-6
    assert s.tokens_per_second > 0 and s.fusion_us_per_token > 0 and s.seed == 1


def test_plain_generation_stops_at_end_of_generation(engine):
    r = engine.generate("Reply with the single word: yes", None, seed=1, max_tokens=200)
    assert r.stats.finish_reason == "stop" and r.stats.generated_tokens < 200
    assert r.stats.mode == "plain" and r.stats.mean_js is None


def test_stream_yields_the_text_as_it_is_decoded(engine):
    stream = engine.stream(QUERY, "helpfulness", seed=2, max_tokens=30)
    pieces = list(stream)
    assert len(pieces) > 5
    assert "".join(pieces) == stream.result.text


def test_context_stream_mode_generates(engine_contexts):
    r = engine_contexts.generate(QUERY, "honesty", seed=1, max_tokens=16, ignore_eos=True)
    assert r.stats.streams == "contexts" and r.stats.generated_tokens == 16 and r.stats.mean_js > 0


def test_generation_stops_at_a_full_context(model_path):
    with SDAEngine(str(model_path), n_ctx=96, n_threads=2) as small:
        r = small.generate(QUERY, "helpfulness", seed=1, max_tokens=500, ignore_eos=True)
        assert r.stats.finish_reason == "context"
        assert r.stats.prompt_tokens_with + r.stats.generated_tokens == 96 + 1  # the last token needs no KV cell
        with pytest.raises(ContextOverflowError):
            small.generate("word " * 200, "helpfulness")


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (("",), {}),
        (("   ",), {}),
        ((QUERY, "helpfulnes"), {}),  # typo of a preset
        ((QUERY, "   "), {}),
        ((QUERY, "helpfulness"), {"strength": float("nan")}),
        ((QUERY, "helpfulness"), {"strength": float("inf")}),
        ((QUERY, "helpfulness"), {"strength": -1.0}),
        ((QUERY, "helpfulness"), {"max_tokens": 0}),
        ((QUERY, "helpfulness"), {"temperature_mode": "warm"}),
        ((QUERY, "helpfulness"), {"seed": -3}),
        (("bad \udcff bytes",), {}),
    ],
)
def test_bad_input_raises_input_error(engine, args, kwargs):
    with pytest.raises(InputError):
        engine.generate(*args, **kwargs)


def test_bad_model_files(tmp_path, model_path):
    missing = tmp_path / "missing.gguf"
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model")
    truncated = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    for path in (missing, not_gguf, truncated):
        with pytest.raises(ModelError):
            SDAEngine(str(path))
    with pytest.raises(ModelError):
        SDAEngine("no-such-model-name")
    with pytest.raises(InputError):
        SDAEngine(str(model_path), streams="threads")
