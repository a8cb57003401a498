"""The batch policy (layout.BatchPolicy, --exact): small exact ubatches on CPU, llama.cpp's usual ubatch when
layers are offloaded to a GPU or when asked, in every context the engine makes."""

from __future__ import annotations

import json

import pytest

from sda_local import SDAEngine
from sda_local.engine.layout import EXACT_ENV, N_UBATCH_FAST, batch_policy, exact_ubatch
from sda_local.engine.llama import devices, supports_gpu_offload
from sda_local.errors import InputError

from conftest import TEST_NGL, run_cli


def test_auto_is_exact_unless_layers_are_offloaded(monkeypatch):
    monkeypatch.delenv(EXACT_ENV, raising=False)
    assert batch_policy(None, 0, gpu_offload=True).exact
    assert not batch_policy(None, 99, gpu_offload=True).exact
    assert not batch_policy("auto", -1, gpu_offload=True).exact  # -1: all layers
    assert batch_policy(None, 99, gpu_offload=False).exact  # a CPU build ignores -ngl: nothing is offloaded
    assert batch_policy("on", 99, gpu_offload=True).n_ubatch == exact_ubatch()
    assert batch_policy("off", 0, gpu_offload=False).n_ubatch == N_UBATCH_FAST == 512
    monkeypatch.setenv(EXACT_ENV, "off")
    assert not batch_policy(None, 0, gpu_offload=False).exact
    assert batch_policy("on", 0, gpu_offload=False).exact  # the argument wins over the environment
    monkeypatch.setenv(EXACT_ENV, "sometimes")
    with pytest.raises(InputError, match=f"{EXACT_ENV} must be one of auto, on, off, got 'sometimes'"):
        batch_policy(None, 0)
    with pytest.raises(InputError, match="exact must be one of"):
        batch_policy("yes", 0)


def test_the_exact_ubatch_stays_below_where_another_device_takes_a_matmul():
    assert exact_ubatch(["CPU"]) == 32  # under the CPU matmul's 64-row switch
    for build in (["CPU", "ACCEL"], ["GPU", "ACCEL", "CPU"], ["GPU", "CPU"], ["IGPU", "CPU"], []):
        assert exact_ubatch(build) == 16  # ggml-blas and op_offload take matmuls from 32 rows on; unknown: 16
    # This build, read from ggml's device registry (a CPU-only llama-cpp-python here: one CPU device).
    found = devices()
    assert found and ("CPU", "CPU") in found
    if not supports_gpu_offload() and len(found) == 1:
        assert exact_ubatch() == 32


def _ubatches(engine):
    contexts = list(engine.scheduler.layout.contexts)
    with engine.forcing() as forcing:
        contexts.append(forcing.ctx)
    return {ctx.n_ubatch for ctx in contexts}


def test_every_context_of_an_engine_takes_the_policys_ubatch(model_path):
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2, exact="on") as exact:
        assert exact.batching.exact and _ubatches(exact) == {exact_ubatch()}
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2, exact="off", streams="contexts") as fast:
        assert not fast.batching.exact and _ubatches(fast) == {N_UBATCH_FAST}
        # What "off" still promises: the same request on the same cache state gives the same answer.
        query = "Describe the water cycle in detail, step by step, for a class of ten-year-olds. " * 6
        first = fast.generate(query, "helpfulness", strength=0.5, max_tokens=12, seed=5)
        fast.reset_caches()
        again = fast.generate(query, "helpfulness", strength=0.5, max_tokens=12, seed=5)
        assert first.tokens == again.tokens and first.stats.prefill_tokens_with > exact_ubatch()


@pytest.mark.skipif(bool(TEST_NGL), reason="the tests' -ngl is applied under the engine, which sees 0 layers")
def test_auto_is_exact_on_cpu_and_reads_the_environment(model_path, monkeypatch):
    monkeypatch.delenv(EXACT_ENV, raising=False)
    with SDAEngine(str(model_path), n_ctx=256, n_threads=2) as default:
        assert default.batching.exact
    monkeypatch.setenv(EXACT_ENV, "off")
    with SDAEngine(str(model_path), n_ctx=256, n_threads=2) as from_env:
        assert not from_env.batching.exact


def test_cli_exact_option(model_path):
    out = run_cli("generate", "Name a colour.", "-m", str(model_path), "-n", "2", "--seed", "1", "--stats",
                  "--n-ctx", "512", "--exact", "off")
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "; fast batches (ubatch 512)" in err
    out = run_cli("generate", "Name a colour.", "-m", str(model_path), "-n", "2", "--seed", "1", "--stats",
                  "--n-ctx", "512", env={EXACT_ENV: ""})  # empty: unset
    if not TEST_NGL:
        assert f"; exact batches (ubatch {exact_ubatch()})" in out.stderr.decode()
    bad = run_cli("generate", "Hi", "-m", str(model_path), env={EXACT_ENV: "maybe"})
    lines = bad.stderr.decode().strip().splitlines()
    assert bad.returncode != 0 and "Traceback" not in bad.stderr.decode()
    assert lines[-1].endswith(f"{EXACT_ENV} must be one of auto, on, off, got 'maybe'")
    info = run_cli("info", "--json")
    assert info.returncode == 0 and "ubatch" in json.loads(info.stdout)["batches"]


def test_the_ownership_layer_refuses_what_it_cannot_own():
    from sda_local.engine import llama
    from sda_local.errors import ModelError

    with pytest.raises(ModelError, match="a llama.cpp sampler could not be made"):
        llama.SamplerChain([llama.top_p(0.9), None])  # the top-p sampler is freed, not leaked nor added
    batch = llama.Batch(8)
    batch.clear()
    assert batch.add(1, 0, 0, True) == 0 and batch.n_tokens == 1
    batch.free()
    batch.free()  # once only
    with pytest.raises(ModelError, match="batch is freed"):
        batch.clear()
