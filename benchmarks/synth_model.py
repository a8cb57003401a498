"""Benchmark GGUFs at the shapes of real models, with random weights: for speed and memory only.

    pip install gguf
    python benchmarks/synth_model.py llama-1b models-synth/llama-1b.Q4_K_M.gguf
    python benchmarks/synth_model.py llama-8b models-synth/llama-8b.Q4_K_M.gguf
    python benchmarks/synth_model.py llama-1b-gemma-vocab models-synth/llama-1b-262k.Q4_K_M.gguf
    python benchmarks/synth_model.py smollm2-135m models-synth/smollm2-135m.Q4_1.gguf --type q4_1

The architecture, layer count and sizes are those of the real model (LLAMA_SHAPES); the tokenizer, its special
tokens and its chat template are copied from a catalogue model (SmolLM2's 49,152 tokens, or Gemma 3's 262,144
for the large-vocabulary shape), so prompts, templates and sampling cost what they cost at that size. The
weights are random: the text they produce is noise, and nothing but speed and memory may be read off them.

Where the catalogue cannot be fetched (a machine without network), the tokenizer comes from a vocab-only GGUF
instead: ``vocab`` writes one (the donor's metadata, tokenizer, special tokens and chat template, no tensors:
about 2 MB for SmolLM2), and ``--donor PATH`` reads it (or any GGUF, or another catalogue name):

    python benchmarks/synth_model.py vocab smollm2.vocab.gguf                        # where the catalogue is
    python benchmarks/synth_model.py llama-1b llama-1b.Q4_K_M.gguf --donor smollm2.vocab.gguf   # anywhere

``--untied`` gives a tied shape a separate output matrix, for tests: with random weights a tied model repeats
its input token whatever the seed, prompt or batch, an untied one draws varied tokens
(benchmarks/gpu_check.sh runs the test suite on ``smollm2-135m --untied``).

The F16 file is written tensor by tensor (an 8B model never sits in memory whole), then quantized by
llama.cpp's own quantizer (``llama_model_quantize``, Q4_K_M by default) and deleted.

Peaked distributions: with unit-RMS hidden states after the final norm, a logit's standard deviation is
sqrt(n_embd) * std(output weight). The output weight's std is set so that logits have a standard deviation
of LOGIT_STD (5): the next-token distribution of a real instruct model puts most of its mass on a few tokens,
and a flat one would make top-p keep thousands of candidates, which no real model's sampling costs.
``--check`` prints the mean top-1 probability and the mean top-p (0.95) nucleus size over a few steps.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

# Published shapes (config.json of meta-llama/Llama-3.2-1B-Instruct and Llama-3.1-8B-Instruct; SmolLM2-135M:
# config.json of HuggingFaceTB/SmolLM2-135M-Instruct, as in the catalogue model's GGUF metadata).
LLAMA_SHAPES = {
    "smollm2-135m": dict(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, rope_base=100000.0,
                         tied_output=True, donor="smollm2"),
    "llama-1b": dict(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, rope_base=500000.0,
                     tied_output=True, donor="smollm2"),
    "llama-8b": dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, rope_base=500000.0,
                     tied_output=False, donor="smollm2"),
    "llama-1b-gemma-vocab": dict(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, rope_base=500000.0,
                                 tied_output=True, donor="gemma3"),
}
DONORS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma-3-270m-base"}
LOGIT_STD = 5.0
WEIGHT_STD = 0.02  # GPT-2's initialisation: the residual stream stays finite through the layers
N_CTX_TRAIN = 8192


def _copy_field(writer, name: str, field):
    """One key of a donor GGUF, as it is; returns its value."""
    import gguf

    kind = field.types[0]
    value = field.contents()
    if kind == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(name, value, kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(name, value, kind)
    return value


def _copy_tokenizer(reader, writer) -> int:
    """Every tokenizer.* key of the donor GGUF; returns its vocabulary size."""
    n_vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = _copy_field(writer, name, field)
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    return n_vocab


def donor_path(donor: str) -> Path:
    """The donor GGUF: a path (a vocab-only file of ``vocab``, or any GGUF), else a catalogue name (fetched on
    first use)."""
    from sda_local import models

    path = Path(donor).expanduser()
    if path.exists():
        return path
    if donor.lower().endswith(".gguf") or os.sep in donor:
        raise SystemExit(f"synth_model: donor {donor} does not exist")
    return models.pull(models.lookup(donor))


# Written again by GGUFWriter, or not true of a file without tensors.
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version")


def write_vocab_only(donor: str, path: Path) -> int:
    """The donor's metadata (architecture, hyperparameters, tokenizer, special tokens, chat template) without
    its tensors: a donor for ``--donor`` that llama.cpp also loads with ``vocab_only``. Returns its size."""
    import gguf

    reader = gguf.GGUFReader(str(donor_path(donor)))
    writer = gguf.GGUFWriter(str(path), str(reader.fields["general.architecture"].contents()))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in _NOT_COPIED:
            continue
        _copy_field(writer, name, field)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path.stat().st_size


def _tensors(shape: dict, n_vocab: int):
    """(name, numpy shape, kind) in file order; kind: "norm" (ones, f32), "weight", "output"."""
    e, f, hd = shape["n_embd"], shape["n_ff"], shape["n_embd"] // shape["n_head"]
    kv = shape["n_head_kv"] * hd
    yield "token_embd.weight", (n_vocab, e), "embed"
    for i in range(shape["n_layer"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (e,), "norm"
        yield p + "attn_q.weight", (e, e), "weight"
        yield p + "attn_k.weight", (kv, e), "weight"
        yield p + "attn_v.weight", (kv, e), "weight"
        yield p + "attn_output.weight", (e, e), "weight"
        yield p + "ffn_norm.weight", (e,), "norm"
        yield p + "ffn_gate.weight", (f, e), "weight"
        yield p + "ffn_up.weight", (f, e), "weight"
        yield p + "ffn_down.weight", (e, f), "weight"
    yield "output_norm.weight", (e,), "norm"
    if not shape["tied_output"]:
        yield "output.weight", (n_vocab, e), "output"


def _values(kind: str, dims, rng, n_embd: int) -> np.ndarray:
    if kind == "norm":
        return np.ones(dims, dtype=np.float32)
    # Tied output (1B): the embedding is the output matrix, so it carries the output's scale.
    std = LOGIT_STD / np.sqrt(n_embd) if kind in ("output", "embed") else WEIGHT_STD
    out = np.empty(dims, dtype=np.float16)
    rows = max(1, (1 << 24) // int(np.prod(dims[1:]) or 1))  # 16M values at a time
    for start in range(0, dims[0], rows):
        block = rng.standard_normal((min(rows, dims[0] - start), *dims[1:]), dtype=np.float32)
        out[start:start + len(block)] = block * np.float32(std)
    return out


def write_f16(name: str, path: Path, seed: int = 0, shape: dict = None, donor: str = None) -> None:
    """The F16 GGUF of LLAMA_SHAPES[name] (or of ``shape``, a dict of the same keys), its tokenizer from
    ``donor`` (a GGUF path or catalogue name; default: the shape's catalogue donor)."""
    import gguf

    shape = shape or LLAMA_SHAPES[name]
    donor = gguf.GGUFReader(str(donor_path(donor or DONORS[shape["donor"]])))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"sda-local synthetic {name} (random weights: speed and memory only)")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(shape["n_embd"])
    writer.add_block_count(shape["n_layer"])
    writer.add_feed_forward_length(shape["n_ff"])
    writer.add_head_count(shape["n_head"])
    writer.add_head_count_kv(shape["n_head_kv"])
    writer.add_rope_dimension_count(shape["n_embd"] // shape["n_head"])
    writer.add_rope_freq_base(shape["rope_base"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_vocab = _copy_tokenizer(donor, writer)
    writer.add_vocab_size(n_vocab)
    specs = list(_tensors(shape, n_vocab))
    for tensor, dims, kind in specs:
        dtype = np.float32 if kind == "norm" else np.float16
        writer.add_tensor_info(tensor, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for tensor, dims, kind in specs:
        writer.write_tensor_data(_values(kind, dims, rng, shape["n_embd"]))
    writer.close()


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def check(path: Path, steps: int = 24) -> dict:
    """Mean top-1 probability and top-p (0.95) nucleus size of the next-token distributions over a prompt."""
    from sda_local import SDAEngine

    with SDAEngine(str(path), n_ctx=512, n_threads=os.cpu_count()) as engine:
        request = engine.request(engine.render(None, "Tell me about the sea."), None, max_tokens=1, seed=0,
                                 capture_logits=True)
        job = engine.submit(request)
        engine.scheduler.wait(job)
        rows = [job.first_logits[0]]
        text = engine.generate("Tell me about the sea.", max_tokens=steps, seed=1).text
    top1, nucleus = [], []
    for row in rows:
        p = np.exp(row - row.max())
        p /= p.sum()
        s = np.sort(p)[::-1]
        top1.append(float(s[0]))
        nucleus.append(int(np.searchsorted(np.cumsum(s), 0.95) + 1))
    return {"top1_p": round(float(np.mean(top1)), 3), "nucleus_95": int(np.mean(nucleus)), "sample": text[:80]}


def main() -> None:
    from sda_local.errors import SDAError

    try:
        _main()
    except (SDAError, OSError, ValueError) as exc:  # a donor that is missing or no GGUF, a full disk: one line
        raise SystemExit(f"synth_model: {exc}") from None


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(LLAMA_SHAPES) + ["vocab"],
                        help="a model shape, or vocab: the donor's vocab-only GGUF (no tensors), for --donor")
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", default="q4_k_m", help="llama.cpp quantization (Q4_K_M, Q8_0, …)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--check", action="store_true", help="print how peaked its distributions are")
    parser.add_argument("--untied", action="store_true",
                        help="a separate output matrix where the real model ties it to the embedding: for tests (with "
                             "random weights a tied model repeats its input token whatever the seed or prompt; an "
                             "untied one draws varied tokens)")
    parser.add_argument("--donor", default=None,
                        help="tokenizer and chat template from this GGUF (e.g. a vocab-only file) or catalogue name "
                             "(default: the shape's catalogue model; for vocab: smollm2-135m-instruct)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.shape == "vocab":
        size = write_vocab_only(args.donor or DONORS["smollm2"], args.out)
        print(f"{args.out}: vocab only, {size / 2**20:.1f} MiB", file=sys.stderr)
        return
    f16 = args.out.with_name(args.out.stem + ".f16.tmp.gguf")
    started = time.perf_counter()
    try:
        shape = dict(LLAMA_SHAPES[args.shape], tied_output=False) if args.untied else None
        write_f16(args.shape, f16, shape=shape, donor=args.donor)
        written = time.perf_counter()
        quantize(f16, args.out, args.type, args.threads)
    finally:
        f16.unlink(missing_ok=True)
    print(f"{args.out}: {args.out.stat().st_size / 2**30:.2f} GiB, F16 written in {written - started:.0f} s, "
          f"quantized in {time.perf_counter() - written:.0f} s", file=sys.stderr)
    if args.check:
        print(check(args.out))


if __name__ == "__main__":
    main()
