"""benchmarks/synth_model.py on a tiny shape: the file it writes loads in llama.cpp, generates, has peaked
next-token distributions, and its KV estimate is exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("gguf")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "synth_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("synth_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_synthetic_model_loads_generates_and_is_peaked(tmp_path):
    synth = load_script()
    shape = dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, rope_base=10000.0, tied_output=False,
                 donor="smollm2")
    f16, out = tmp_path / "tiny.f16.gguf", tmp_path / "tiny.Q8_0.gguf"
    synth.write_f16("tiny", f16, shape=shape)
    synth.quantize(f16, out, "q8_0", 2)
    from sda_local.gguf_model import attention_shape_of

    assert attention_shape_of(out) == ((2, 2), 64, 64)
    checked = synth.check(out, steps=8)
    assert checked["top1_p"] > 0.2 and checked["nucleus_95"] < 1000, checked  # not a flat distribution
    from sda_local import SDAEngine

    with SDAEngine(str(out), n_ctx=256, n_threads=2) as engine:
        result = engine.generate("Hi", "helpfulness", strength=0.5, max_tokens=4, seed=1, ignore_eos=True)
        assert result.stats.generated_tokens == 4
        assert engine.kv_memory.per_slot == 2 * 256 * 2 * 2 * (64 * 2 + 64 * 2)
