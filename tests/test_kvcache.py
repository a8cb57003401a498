"""The KV cache's types, flash attention and the memory they take (engine/kvcache.py), on both catalogue models."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from sda_local import SDAEngine, models
from sda_local.errors import InputError

from conftest import run_cli

# Runs in a child process: llama.cpp's log (verbose) goes to its stderr, the estimate and RSS to stdout.
PROBE = r"""
import json, sys
from sda_local import SDAEngine
path, n_ctx, parallel, kt, vt, verbose = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6] == "1"
def rss():  # anonymous pages only: the model's file-backed pages may be evicted on a busy machine
    if sys.platform != "linux":  # no RssAnon: the test that compares it is skipped there
        return 0
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
before = rss()
with SDAEngine(path, n_ctx=n_ctx, parallel=parallel, n_threads=2, verbose=verbose, cache_type_k=kt, cache_type_v=vt) as e:
    text = e.generate("Name a colour.", max_tokens=8, seed=1).text
    print(json.dumps({"kv": e.kv_memory.to_dict(), "rss": rss() - before, "text": text}))
"""


def probe(path, n_ctx, parallel, kt="f16", vt="f16", verbose=True):
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(n_ctx), str(parallel), kt, vt,
                          "1" if verbose else "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture(scope="module")
def gemma_path():
    return models.pull(models.lookup("gemma-3-270m-base"))


@pytest.mark.parametrize("types", [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0")])
@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_the_estimate_is_what_llama_cpp_allocates(model_path, gemma_path, which, types):
    path = model_path if which == "smollm2" else gemma_path
    result, log = probe(path, 1024, 2, *types)
    # llama.cpp logs one line per cache (two for Gemma 3's sliding-window layers), rounded to 0.01 MiB
    sizes = [float(m) for m in re.findall(r"llama_kv_cache: size =\s+([\d.]+) MiB", log)]
    assert sizes, log[-2000:]
    assert abs(sum(sizes) - result["kv"]["total_bytes"] / 2**20) <= 0.01 * len(sizes)
    assert result["text"]  # and it generates


@pytest.mark.skipif(sys.platform != "linux", reason="reads RssAnon from /proc (Linux only)")
def test_q8_0_takes_less_memory_than_f16(model_path):
    f16, _ = probe(model_path, 8192, 2, verbose=False)
    q8, _ = probe(model_path, 8192, 2, "q8_0", "q8_0", verbose=False)
    saved = f16["kv"]["total_bytes"] - q8["kv"]["total_bytes"]
    assert saved > 300 * 2**20  # 720 MiB against 383 MiB for two slots of 8192 tokens
    # llama.cpp clears the cache at creation, so its pages are resident: the process is measurably smaller
    assert f16["rss"] - q8["rss"] > saved / 2, (f16["rss"], q8["rss"])


def test_q8_0_cache_is_deterministic_and_steers(model_path):
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2, cache_type_k="q8_0", cache_type_v="q8_0") as e:
        a = e.generate("How do I boil an egg?", "helpfulness", strength=0.5, max_tokens=16, seed=3)
        b = e.generate("How do I boil an egg?", "helpfulness", strength=0.5, max_tokens=16, seed=3)
        assert a.text == b.text and a.stats.mode == "sda" and a.stats.mean_js > 0


def test_bad_kv_settings_are_refused(model_path):
    with pytest.raises(InputError, match="quantized V cache needs flash attention"):
        SDAEngine(str(model_path), cache_type_v="q8_0", flash_attn="off")
    with pytest.raises(InputError, match="unknown cache type K"):
        SDAEngine(str(model_path), cache_type_k="q2_k")


def test_cli_kv_options_and_stats(model_path):
    out = run_cli("generate", "Name a colour.", "-m", str(model_path), "-n", "4", "--seed", "1", "--stats",
                  "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--n-ctx", "1024")
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "KV cache (q8_0/q8_0): 24 MiB per slot, 24 MiB for 1 slot" in err
    bad = run_cli("generate", "Hi", "-m", str(model_path), "--cache-type-v", "q4_0", "--flash-attn", "off")
    bad_err = bad.stderr.decode()
    assert bad.returncode != 0 and "Traceback" not in bad_err
    assert "a quantized V cache needs flash attention" in bad_err


def test_info_estimates_a_models_kv_memory(model_path):
    out = run_cli("info", "--json", "-m", str(model_path), "--n-ctx", "1024", "--parallel", "2")
    assert out.returncode == 0, out.stderr.decode()
    kv = json.loads(out.stdout)["kv_cache"]
    assert kv["per_slot_bytes"] == 2 * 1024 * 30 * 3 * (64 * 2 + 64 * 2) and kv["total_bytes"] == 2 * kv["per_slot_bytes"]
    text = run_cli("info", "-m", str(model_path), "--n-ctx", "1024", "-np", "4", "-ctk", "q8_0", "-ctv", "q8_0")
    assert "kv_cache: KV cache (q8_0/q8_0): 24 MiB per slot, 96 MiB for 4 slots" in text.stdout.decode()


def test_the_forcing_context_starts_small_and_grows_to_the_same_numbers(engine):
    from sda_local.engine.forcing import START_CELLS, ForcingContext

    model = engine.model
    prompt = model.tokenize("Tell me everything about the sea. " * 120, add_bos=False, special=False)  # > 1024
    answer = model.tokenize("The sea is large, deep and salty, and it covers most of the Earth. " * 16,
                            add_bos=False, special=False)
    assert len(prompt) < START_CELLS < len(prompt) + len(answer) <= 2048
    growing = ForcingContext(model, n_ctx=2048, n_threads=2)
    full = ForcingContext(model, n_ctx=2048, n_threads=2)
    try:
        assert growing.capacity == START_CELLS
        full._grow(2048)
        a = growing.continuation_logprobs([prompt, prompt[5:]], answer)
        assert growing.capacity == 2048  # reserved before the call decoded anything
        b = full.continuation_logprobs([prompt, prompt[5:]], answer)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)  # same batches, same numbers
        # growth in the middle of a series of calls (a branch after a kept prefix): what was held is decoded again
        mid = ForcingContext(model, n_ctx=2048, n_threads=2)
        try:
            first = mid.next_logprobs(prompt, [1, 2, 3])
            again = mid.branch_logprobs(0, len(prompt), answer, [1, 2, 3])
            assert mid.capacity == 2048
            np.testing.assert_allclose(first, full.next_logprobs(prompt, [1, 2, 3]), atol=1e-4)
            np.testing.assert_allclose(again, full.branch_logprobs(0, len(prompt), answer, [1, 2, 3]), atol=1e-4)
        finally:
            mid.close()
        short = growing.continuation_logprobs([prompt[:50]], answer[:10])  # and goes on working
        assert len(short[0]) == 10
    finally:
        growing.close()
        full.close()
