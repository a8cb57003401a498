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
    from sda_local.models.gguf import attention_shape_of

    assert attention_shape_of(out) == ((2, 2), 64, 64)
    checked = synth.check(out, steps=8)
    assert checked["top1_p"] > 0.2 and checked["nucleus_95"] < 1000, checked  # not a flat distribution
    from sda_local import SDAEngine

    with SDAEngine(str(out), n_ctx=256, n_threads=2) as engine:
        result = engine.generate("Hi", "helpfulness", strength=0.5, max_tokens=4, seed=1, ignore_eos=True)
        assert result.stats.generated_tokens == 4
        assert engine.kv_memory.per_slot == 2 * 256 * 2 * 2 * (64 * 2 + 64 * 2)


def test_the_vocab_only_donor_and_the_default_models_shape(tmp_path):
    """``vocab`` writes the donor's metadata without tensors (a few MB, loadable by llama.cpp's vocab_only);
    ``--donor`` builds from it what the catalogue donor builds; smollm2-135m is the default model's shape."""
    import gguf
    import llama_cpp

    from sda_local import models

    synth = load_script()
    real = models.resolve(None)
    donor = tmp_path / "smollm2.vocab.gguf"
    assert synth.write_vocab_only(str(real), donor) < 4 << 20
    reader, real_reader = gguf.GGUFReader(str(donor)), gguf.GGUFReader(str(real))
    assert len(reader.tensors) == 0
    for name, field in real_reader.fields.items():
        if name.startswith(("tokenizer.", "llama.")):
            assert reader.fields[name].contents() == field.contents(), name

    vocab = llama_cpp.Llama(str(donor), vocab_only=True, verbose=False)
    text = b"<|im_start|>user\nHow do I fix a flat bike tyre? \xc3\xa9<|im_end|>"
    assert vocab.tokenize(text, special=True) == llama_cpp.Llama(str(real), vocab_only=True,
                                                                 verbose=False).tokenize(text, special=True)

    shape = dict(n_layer=1, n_embd=128, n_ff=256, n_head=2, n_head_kv=1, rope_base=10000.0, tied_output=True,
                 donor="smollm2")
    from_donor, from_catalogue = tmp_path / "a.f16.gguf", tmp_path / "b.f16.gguf"
    synth.write_f16("tiny", from_donor, shape=shape, donor=str(donor))
    synth.write_f16("tiny", from_catalogue, shape=shape)
    assert from_donor.read_bytes() == from_catalogue.read_bytes()
    with pytest.raises(SystemExit, match="does not exist"):
        synth.write_f16("tiny", tmp_path / "c.gguf", shape=shape, donor=str(tmp_path / "missing.gguf"))

    published = synth.LLAMA_SHAPES["smollm2-135m"]
    for key, field in [("n_layer", "block_count"), ("n_embd", "embedding_length"), ("n_ff", "feed_forward_length"),
                       ("n_head", "attention.head_count"), ("n_head_kv", "attention.head_count_kv"),
                       ("rope_base", "rope.freq_base")]:
        assert published[key] == real_reader.fields[f"llama.{field}"].contents(), key
    assert published["tied_output"] == ("output.weight" not in {t.name for t in real_reader.tensors})
