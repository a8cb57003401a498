"""Where every slot's streams live in llama.cpp: contexts, sequence ids, and the batches that decode them.

A slot holds one request at a time; its two streams (with and without the instruction) are two sequences.
Two layouts, one interface:

* ``batched``  - one llama_context; slot i's streams are sequences 2i and 2i+1. Every step decodes every
  active stream of every slot in one ``llama_decode``.
* ``contexts`` - two llama_contexts on the same weights (the old llama.cpp CFG design); slot i's with-stream
  is sequence i of the first, its without-stream sequence i of the second. A step is one decode in each.

Each sequence has its own KV stream (``kv_unified = false``) of ``n_ctx`` cells. That is what keeps a
request's tokens independent of everything else in the batch: llama.cpp's CPU flash attention sums over a
sequence's cells in cell order, skipping the masked ones, so a sequence computes bit for bit the same as
long as its cells stay in position order. In a unified cache they do not: once another request frees
cells below, llama.cpp's slot search starts again from cell 0 and the running sequence's next tokens land
before its earlier ones (measured: logits move by ~0.6 on SmolLM2-135M). In its own stream a sequence
always grows from cell 0 in order, also after a truncation, so reusing a cached prefix is exact too.
The price: the two prompts' common prefix is decoded in both sequences (two rows of the same ubatch)
instead of once, because llama.cpp copies across KV streams only whole buffers.

llama.cpp takes sequences of different KV streams into one ubatch only when their ids are consecutive, so
a step over slots {0, 2} costs two graph computations (about 1.5x one); the scheduler fills the lowest
free slot first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..errors import InputError
from ..models.gguf import GGUFModel
from .llama import Batch, Context, devices, supports_gpu_offload

STREAM_MODES = ("batched", "contexts")
N_BATCH = 512  # rows per llama_decode at most
# llama.cpp's CPU matmul takes another kernel from 64 rows per ubatch on, with visibly different rounding
# (logits move by ~0.5 on SmolLM2-135M Q4_1). Below that, each row's result is bit-identical to decoding
# it alone, so a stream's KV cache does not depend on how its prompt was split into batches nor on the
# other rows of the batch: batched, contexts, prefill chunking, cache reuse and concurrent requests all
# see the same logits, and a = 0 is exactly prompting. A build with any other device (a GPU; BLAS; every macOS
# build: Metal and Accelerate) gives ggml's scheduler another place for a matmul of 32 rows or more even with
# no layer offloaded (ggml-blas's minimum batch; op_offload), so there the exact ubatch stays below that.
N_UBATCH_CPU, N_UBATCH_SHARED = 32, 16


def exact_ubatch(device_types: Optional[Sequence[str]] = None) -> int:
    """The exact ubatch of a llama.cpp build whose devices are of ``device_types`` (this build's when None; a
    registry that cannot be read counts as not CPU-only)."""
    if device_types is None:
        device_types = [kind for _, kind in devices()]
    return N_UBATCH_CPU if device_types and set(device_types) == {"CPU"} else N_UBATCH_SHARED


# llama.cpp's own default: what a GPU wants for prefill, where exactness across batch shapes does not hold
# anyway (the backends pick kernels by batch size too).
N_UBATCH_FAST = 512
EXACT_MODES = ("auto", "on", "off")
EXACT_ENV = "SDA_LOCAL_EXACT"
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ

WITH, WITHOUT = 0, 1  # stream indices

Location = Tuple[int, int]  # (context index, sequence id)


@dataclass(frozen=True)
class BatchPolicy:
    """How prompts are cut into llama.cpp ubatches. ``exact``: ubatches of ``exact_ubatch()`` rows, so that a
    row's logits do not depend on the batch it was decoded in (on CPU), at a prefill cost; otherwise llama.cpp's
    usual N_UBATCH_FAST."""

    exact: bool

    @property
    def n_ubatch(self) -> int:
        return exact_ubatch() if self.exact else N_UBATCH_FAST

    def describe(self) -> str:
        return f"{'exact' if self.exact else 'fast'} batches (ubatch {self.n_ubatch})"


EXACT = BatchPolicy(True)


def batch_policy(mode: Optional[str], n_gpu_layers: int, gpu_offload: Optional[bool] = None) -> BatchPolicy:
    """``mode``: "on", "off" or "auto" (None reads $SDA_LOCAL_EXACT, else "auto"). auto is exact unless layers
    are offloaded to a GPU: there small ubatches are slow and batch-invariance is not promised by the backend.
    ``gpu_offload``: whether this llama.cpp build can offload (asked of llama.cpp when None)."""
    value = mode if mode is not None else (os.environ.get(EXACT_ENV) or "auto")
    value = str(value).strip().lower()
    if value not in EXACT_MODES:
        source = "exact" if mode is not None else EXACT_ENV
        raise InputError(f"{source} must be one of {', '.join(EXACT_MODES)}, got {value!r}")
    if value != "auto":
        return BatchPolicy(value == "on")
    if gpu_offload is None:
        gpu_offload = supports_gpu_offload()
    return BatchPolicy(not (gpu_offload and n_gpu_layers != 0))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVLayout:
    """The llama.cpp contexts of ``n_slots`` slots, each with two streams of ``n_ctx`` cells."""

    def __init__(self, mode: str, model: GGUFModel, *, n_slots: int, n_ctx: int, n_threads: int, kv=None,
                 batching: BatchPolicy = EXACT):
        if mode not in STREAM_MODES:
            raise InputError(f"unknown streams mode {mode!r} (choose from {', '.join(STREAM_MODES)})")
        per_context = 2 * n_slots if mode == "batched" else n_slots
        if per_context > MAX_SEQUENCES:
            raise InputError(f"at most {MAX_SEQUENCES // 2} parallel slots, got {n_slots}")
        self.mode, self.n_slots, self.n_ctx = mode, n_slots, n_ctx
        self.contexts: List[Context] = []
        try:
            for _ in range(1 if mode == "batched" else 2):
                self.contexts.append(Context(model, n_ctx=per_context * n_ctx, n_batch=N_BATCH,
                                             n_ubatch=batching.n_ubatch, n_threads=n_threads,
                                             n_seq_max=per_context, kv_unified=False, kv=kv))
        except BaseException:
            self.close()
            raise
        self.batches = [Batch(N_BATCH) for _ in self.contexts]

    def location(self, slot: int, stream: int) -> Location:
        if self.mode == "batched":
            return 0, 2 * slot + stream
        return stream, slot

    def forget(self, location: Location, keep: int) -> None:
        """Drop a sequence's cache positions >= keep."""
        ctx_index, seq = location
        self.contexts[ctx_index].forget(seq, keep)

    def clear(self) -> None:
        for context in self.contexts:
            context.clear()

    def decode(self, ctx_index: int) -> None:
        batch = self.batches[ctx_index]
        if batch.n_tokens:
            self.contexts[ctx_index].decode(batch)

    def close(self) -> None:
        for batch in getattr(self, "batches", ()):
            batch.free()
        for context in self.contexts:
            context.close()
