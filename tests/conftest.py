"""Shared fixtures: the real default model, fetched once into the user cache and reused by the session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sda_local import SDAEngine, models
from sda_local.models import hardware

# SDA_LOCAL_TEST_MODEL=PATH: the model tests use this GGUF instead of the default catalogue model (on a machine
# that cannot fetch it: e.g. benchmarks/synth_model.py's smollm2-135m shape, the default model's size and
# tokenizer with random weights, so tests that read the real model's text fail there; benchmarks/gpu_check.sh
# lists them). The servers the tests start get it too, where a test gives none.
TEST_MODEL = os.environ.get("SDA_LOCAL_TEST_MODEL") or None
# SDA_LOCAL_TEST_NGL=N: every model the tests load, in this process and in the servers they start, offloads N
# layers to the GPU (99: all) unless the test asks for some itself; needs a CUDA/Metal llama-cpp-python.
TEST_NGL = int(os.environ.get("SDA_LOCAL_TEST_NGL") or 0)

if TEST_NGL:
    _model_params = hardware.model_params

    def _offloaded_model_params(n_gpu_layers: int = 0, repack=None):
        return _model_params(n_gpu_layers or TEST_NGL, repack)

    hardware.model_params = _offloaded_model_params


@pytest.fixture(scope="session")
def model_path():
    if TEST_MODEL:
        path = Path(TEST_MODEL).expanduser()
        if not path.is_file():
            pytest.exit(f"SDA_LOCAL_TEST_MODEL: no such file: {path}", returncode=4)
        return path
    return models.resolve(None)  # fetches SmolLM2-135M-Instruct on first use, verifying its sha256


# SDA_LOCAL_TEST_CACHE_TYPE=q8_0 runs the tests on the shared engine with that KV cache type (K and V).
TEST_CACHE_TYPE = os.environ.get("SDA_LOCAL_TEST_CACHE_TYPE", "f16")


@pytest.fixture(scope="session")
def engine(model_path):
    with SDAEngine(str(model_path), n_ctx=2048, n_threads=2, streams="batched", cache_type_k=TEST_CACHE_TYPE,
                   cache_type_v=TEST_CACHE_TYPE) as e:
        yield e


@pytest.fixture(scope="session")
def gemma_engine():
    """The second catalogue model (Gemma 3 270M base: BOS wanted, no chat template), fetched once."""
    with SDAEngine(str(models.pull(models.lookup("gemma-3-270m-base"))), n_ctx=512, n_threads=2) as e:
        yield e


@pytest.fixture(scope="session")
def engine_contexts(model_path):
    with SDAEngine(str(model_path), n_ctx=2048, n_threads=2, streams="contexts", cache_type_k=TEST_CACHE_TYPE,
                   cache_type_v=TEST_CACHE_TYPE) as e:
        yield e


def run_cli(*args, input_bytes=None, env=None, timeout=300):
    """Run the installed ``sda-local`` entry point exactly as a user would; returns CompletedProcess (bytes)."""
    full_env = dict(os.environ, **(env or {}))
    exe = os.path.join(os.path.dirname(sys.executable), "sda-local")
    return subprocess.run([exe, *args], input=input_bytes, capture_output=True, env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def rows_batch_invariant(engine):
    """Whether this CPU's llama.cpp kernels give a row the same logits alone in a ubatch as beside others.

    The scheduler's promise that a job's tokens do not depend on what else runs rests on it (layout.py). It
    holds where measured (AVX2 AMD EPYC: bit-identical) but not on every CPU: llama.cpp computes an output
    layer of one row with its vec_dot kernels and of several with llamafile's sgemm, whose rounding differs on
    some instruction sets. Probed directly: one decode step of sequence 0 alone, then the same step beside one
    and beside five other sequences in one ubatch, on a context like the engine's (its KV cache type).
    """
    import numpy as np

    from sda_local.engine.layout import N_BATCH
    from sda_local.engine.llama import Batch, Context, logits_row

    model = engine.model
    n_seq = 6  # up to the rows the tests that rely on it decode at once (three SDA jobs)
    ctx = Context(model, n_ctx=n_seq * 256, n_batch=N_BATCH, n_ubatch=engine.batching.n_ubatch, n_threads=2,
                  n_seq_max=n_seq, kv=engine.kv)
    batch = Batch(N_BATCH)
    try:
        prompts = [model.tokenize(text, add_bos=False, special=False) for text in
                   ("The capital of France is", "A list of fruits: apple,", "def main():", "Once upon a time",
                    "The weather today", "Dear Sir or Madam,")]
        rows = []
        for group in ([0], [0, 1], list(range(n_seq))):
            ctx.clear()
            for seq in range(n_seq):  # each prompt alone, as prefill does when no other row is ready
                batch.clear()
                for pos, token in enumerate(prompts[seq][:-1]):
                    batch.add(token, pos, seq, False)
                ctx.decode(batch)
            batch.clear()
            outputs = {seq: batch.add(prompts[seq][-1], len(prompts[seq]) - 1, seq, True) for seq in group}
            ctx.decode(batch)
            rows.append(logits_row(ctx.row(outputs[0]), model.n_vocab).copy())
        return all(np.array_equal(rows[0], row) for row in rows[1:])
    finally:
        batch.free()
        ctx.close()
