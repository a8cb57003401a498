"""The two decoding streams of SDA on one set of weights.

Both streams receive every sampled token; they differ only in their prompts. Two layouts, one interface:

* ``batched``  - one llama_context with two sequences (seq 0 = with instruction, seq 1 = without) in a
  unified KV cache. The prompts' common prefix is decoded once and shared with ``llama_memory_seq_cp``;
  each step decodes both streams' new token in a single ``llama_decode``.
* ``contexts`` - a second llama_context on the same llama_model; each step decodes the token in each.

After ``prefill`` and after every ``step``, ``with_logits`` / ``without_logits`` say where the next-token
logits of each stream are, as (context, output index) for ``llama_get_logits_ith``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import llama_cpp

from .errors import InputError, ModelError
from .gguf_model import GGUFModel

STREAM_MODES = ("batched", "contexts")
N_BATCH = 512
# llama.cpp's CPU matmul takes another kernel from 64 rows per ubatch on, with visibly different rounding
# (logits move by ~0.5 on SmolLM2-135M Q4_1). Below that, results are bit-identical to token-by-token
# decoding, so a stream's KV cache no longer depends on how its prompt was split into batches: batched,
# contexts and plain generation then see the same logits, and a = 0 is exactly prompting.
N_UBATCH = 32

SEQ_WITH = 0
SEQ_WITHOUT = 1

LogitsLocation = Tuple[object, int]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Batch:
    """A reusable llama_batch; tokens are appended with their position, sequence and logits flag."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 2)

    def clear(self) -> None:
        self.batch.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1

    @property
    def full(self) -> bool:
        return self.batch.n_tokens >= self.capacity

    def free(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


def _decode(ctx, batch: _Batch) -> None:
    rc = llama_cpp.llama_decode(ctx, batch.batch)
    if rc != 0:
        raise ModelError(f"llama_decode failed (code {rc}): out of context or memory")


class StreamPair:
    """Common bookkeeping; subclasses implement the layout."""

    mode = ""

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_threads: int):
        self.model = model
        self.n_ctx = n_ctx  # per stream
        self.n_threads = n_threads
        self.steered = False  # whether the without-instruction stream is active
        self.n_past_with = 0
        self.n_past_without = 0
        self.shared_prefix = 0
        self.with_logits: LogitsLocation = (None, -1)
        self.without_logits: LogitsLocation = (None, -1)
        self._batch = _Batch(N_BATCH)

    def prefill(self, with_tokens: List[int], without_tokens: Optional[List[int]]) -> None:
        """Start both streams afresh on their prompts (``without_tokens=None``: one plain stream)."""
        raise NotImplementedError

    def step(self, token: int) -> None:
        """Append ``token`` to the active streams and compute their next-token logits."""
        raise NotImplementedError

    @property
    def room(self) -> int:
        """Tokens that can still be appended before a stream's context is full."""
        n = max(self.n_past_with, self.n_past_without if self.steered else 0)
        return self.n_ctx - n

    def _decode_tokens(self, ctx, tokens: Sequence[int], start_pos: int, seq: int, logits_last: bool) -> None:
        b = self._batch
        b.clear()
        for i, tok in enumerate(tokens):
            last = i == len(tokens) - 1
            b.add(tok, start_pos + i, seq, logits_last and last)
            if b.full or last:
                _decode(ctx, b)
                b.clear()

    def close(self) -> None:
        self._batch.free()


class BatchedStreams(StreamPair):
    mode = "batched"

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_threads: int):
        super().__init__(model, n_ctx=n_ctx, n_threads=n_threads)
        # Unified cache sized for both streams at full length; the shared prefix is stored once.
        self.ctx = model.new_context(
            n_ctx=2 * n_ctx, n_batch=N_BATCH, n_ubatch=N_UBATCH, n_threads=n_threads, n_seq_max=2, kv_unified=True
        )
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def prefill(self, with_tokens, without_tokens):
        llama_cpp.llama_memory_clear(self.memory, True)
        self.steered = without_tokens is not None
        if not self.steered:
            self._decode_tokens(self.ctx, with_tokens, 0, SEQ_WITH, logits_last=True)
            self.n_past_with, self.n_past_without, self.shared_prefix = len(with_tokens), 0, 0
            self.with_logits = (self.ctx, -1)
            return
        # Each stream keeps at least its last prompt token, decoded together in the final batch below.
        shared = min(common_prefix_length(with_tokens, without_tokens), len(with_tokens) - 1, len(without_tokens) - 1)
        self._decode_tokens(self.ctx, with_tokens[:shared], 0, SEQ_WITH, logits_last=False)
        if shared:
            llama_cpp.llama_memory_seq_cp(self.memory, SEQ_WITH, SEQ_WITHOUT, -1, -1)
        self._decode_tokens(self.ctx, with_tokens[shared:-1], shared, SEQ_WITH, logits_last=False)
        self._decode_tokens(self.ctx, without_tokens[shared:-1], shared, SEQ_WITHOUT, logits_last=False)
        self.shared_prefix = shared
        self.n_past_with = len(with_tokens) - 1
        self.n_past_without = len(without_tokens) - 1
        self._step_pair(with_tokens[-1], without_tokens[-1])

    def _step_pair(self, token_with: int, token_without: int) -> None:
        b = self._batch
        b.clear()
        b.add(token_with, self.n_past_with, SEQ_WITH, True)
        b.add(token_without, self.n_past_without, SEQ_WITHOUT, True)
        _decode(self.ctx, b)
        self.n_past_with += 1
        self.n_past_without += 1
        self.with_logits = (self.ctx, 0)
        self.without_logits = (self.ctx, 1)

    def step(self, token):
        if self.steered:
            self._step_pair(token, token)
            return
        b = self._batch
        b.clear()
        b.add(token, self.n_past_with, SEQ_WITH, True)
        _decode(self.ctx, b)
        self.n_past_with += 1
        self.with_logits = (self.ctx, 0)

    def close(self):
        super().close()
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


class ContextStreams(StreamPair):
    mode = "contexts"

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_threads: int):
        super().__init__(model, n_ctx=n_ctx, n_threads=n_threads)
        self.ctx_with = model.new_context(n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_UBATCH, n_threads=n_threads)
        self.ctx_without = None  # created on first steered use: plain generation needs one context

    def prefill(self, with_tokens, without_tokens):
        self.steered = without_tokens is not None
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx_with), True)
        self._decode_tokens(self.ctx_with, with_tokens, 0, 0, logits_last=True)
        self.n_past_with = len(with_tokens)
        self.with_logits = (self.ctx_with, -1)
        self.shared_prefix = 0
        self.n_past_without = 0
        if self.steered:
            if self.ctx_without is None:
                self.ctx_without = self.model.new_context(n_ctx=self.n_ctx, n_batch=N_BATCH, n_ubatch=N_UBATCH, n_threads=self.n_threads)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx_without), True)
            self._decode_tokens(self.ctx_without, without_tokens, 0, 0, logits_last=True)
            self.n_past_without = len(without_tokens)
            self.without_logits = (self.ctx_without, -1)

    def step(self, token):
        b = self._batch
        b.clear()
        b.add(token, self.n_past_with, 0, True)
        _decode(self.ctx_with, b)
        self.n_past_with += 1
        if self.steered:
            b.clear()
            b.add(token, self.n_past_without, 0, True)
            _decode(self.ctx_without, b)
            self.n_past_without += 1

    def close(self):
        super().close()
        for ctx in (self.ctx_with, self.ctx_without):
            if ctx:
                llama_cpp.llama_free(ctx)
        self.ctx_with = self.ctx_without = None


def make_streams(mode: str, model: GGUFModel, *, n_ctx: int, n_threads: int) -> StreamPair:
    if mode == "batched":
        return BatchedStreams(model, n_ctx=n_ctx, n_threads=n_threads)
    if mode == "contexts":
        return ContextStreams(model, n_ctx=n_ctx, n_threads=n_threads)
    raise InputError(f"unknown streams mode {mode!r} (choose from {', '.join(STREAM_MODES)})")
