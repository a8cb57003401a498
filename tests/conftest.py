"""Shared fixtures: the real default model, fetched once into the user cache and reused by the session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sda_local import SDAEngine, models


@pytest.fixture(scope="session")
def model_path():
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
