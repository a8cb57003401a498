"""The two decoding streams of SDA on one set of weights, with their KV caches kept across calls.

Both streams receive every sampled token; they differ only in their prompts. Two layouts, one interface:

* ``batched``  - one llama_context with two sequences (seq 0 = with instruction, seq 1 = without) in a
  unified KV cache. The prompts' common prefix is decoded once and shared with ``llama_memory_seq_cp``;
  each step decodes both streams' new token in a single ``llama_decode``.
* ``contexts`` - a second llama_context on the same llama_model; each step decodes the token in each.

Each stream remembers the tokens its cache holds, so a new prompt only decodes what differs from them (a
chat turn prefills only its new tokens). Plain generation (one stream) runs in whichever stream shares the
longest prefix with its prompt. After ``prefill`` and every ``step``, ``with_logits`` / ``without_logits``
say where the next-token logits are, as (context, output index) for ``llama_get_logits_ith``.
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Tuple

import llama_cpp

from .errors import InputError, ModelError
from .gguf_model import GGUFModel

STREAM_MODES = ("batched", "contexts")
N_BATCH = 512
# llama.cpp's CPU matmul takes another kernel from 64 rows per ubatch on, with visibly different rounding
# (logits move by ~0.5 on SmolLM2-135M Q4_1). Below that, results are bit-identical to token-by-token
# decoding, so a stream's KV cache does not depend on how its prompt was split into batches: batched,
# contexts, plain generation and cache reuse all see the same logits, and a = 0 is exactly prompting.
N_UBATCH = 32

WITH, WITHOUT = 0, 1  # stream indices (= sequence ids in the batched layout)

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


class StreamPair:
    """Cache bookkeeping and prefill logic; subclasses map streams onto llama.cpp contexts/sequences."""

    mode = ""
    shares_prefix = False  # whether the without-stream can take the with-stream's prefix without decoding

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_threads: int):
        self.model = model
        self.n_ctx = n_ctx  # per stream
        self.n_threads = n_threads
        self.cached: List[List[int]] = [[], []]  # tokens in each stream's KV cache, position by position
        self.active: List[int] = []  # streams that step() appends to
        self.prefilled = [0, 0]  # tokens decoded by the last prefill, per stream
        self.shared_prefix = 0
        self.with_logits: LogitsLocation = (None, -1)
        self.without_logits: LogitsLocation = (None, -1)
        # llama.cpp contexts this pair owns: freed by close(), or when the pair is collected or the interpreter
        # exits without close() (finalizers run newest first: before the model they were made on).
        self._contexts: List[object] = []
        self._finalizer = weakref.finalize(self, _free_contexts, self._contexts)
        self._batch = _Batch(N_BATCH)

    def _new_context(self, **params):
        ctx = self.model.new_context(**params)
        self._contexts.append(ctx)
        return ctx

    # -- layout primitives (subclasses) ---------------------------------------------------------------
    def _context(self, stream: int):
        raise NotImplementedError

    def _seq(self, stream: int) -> int:
        raise NotImplementedError

    def _forget(self, stream: int, keep: int) -> None:
        """Drop cache positions >= keep of a stream."""
        if len(self.cached[stream]) > keep:
            ctx = self._context(stream)
            if ctx is not None:
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), self._seq(stream), keep, -1)
            del self.cached[stream][keep:]

    def _share(self, upto: int) -> None:
        raise NotImplementedError

    def _step_pair(self, token_with: int, token_without: int) -> None:
        raise NotImplementedError

    # -- decoding -------------------------------------------------------------------------------------
    def _run(self, ctx, batch: _Batch) -> None:
        rc = llama_cpp.llama_decode(ctx, batch.batch)
        if rc != 0:
            self.reset()
            raise ModelError(f"llama_decode failed (code {rc}): out of context or memory")

    def _decode(self, stream: int, tokens: Sequence[int], logits_last: bool) -> None:
        """Append tokens to a stream, decoding them in batches; logits for the last one if asked."""
        ctx, seq, b = self._context(stream), self._seq(stream), self._batch
        start = len(self.cached[stream])
        b.clear()
        for i, tok in enumerate(tokens):
            last = i == len(tokens) - 1
            b.add(tok, start + i, seq, logits_last and last)
            if b.full or last:
                self._run(ctx, b)
                b.clear()
        self.cached[stream].extend(tokens)

    def reset(self) -> None:
        """Empty the caches, cell layout included (after an error or an interrupted step, or to make the
        next generation independent of the previous ones)."""
        for stream in (WITH, WITHOUT):
            ctx = self._context(stream)
            if ctx is not None:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            self.cached[stream] = []
        self.active = []

    def in_sync(self) -> bool:
        """Whether each cache holds exactly the tokens we think (an interrupt may fall between the two)."""
        for stream in (WITH, WITHOUT):
            ctx = self._context(stream)
            if ctx is None:
                continue
            pos_max = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), self._seq(stream))
            if pos_max + 1 != len(self.cached[stream]):
                return False
        return True

    # -- public ---------------------------------------------------------------------------------------
    def prefill(self, with_tokens: List[int], without_tokens: Optional[List[int]]) -> None:
        """Bring the streams to their prompts, decoding only what their caches do not hold yet.

        ``without_tokens=None``: plain generation, in the stream whose cache shares most with the prompt.
        """
        if without_tokens is None:
            self._prefill_plain(with_tokens)
        else:
            self._prefill_pair(with_tokens, without_tokens)

    def _reusable(self, stream: int, tokens: Sequence[int]) -> int:
        # The prompt's last token is always decoded again: its logits are needed.
        return min(common_prefix_length(self.cached[stream], tokens), len(tokens) - 1)

    def _prefill_plain(self, tokens: List[int]) -> None:
        candidates = [WITH] + ([WITHOUT] if self._context(WITHOUT) is not None else [])
        stream = max(candidates, key=lambda s: common_prefix_length(self.cached[s], tokens))
        keep = self._reusable(stream, tokens)
        self._forget(stream, keep)
        self._decode(stream, tokens[keep:], logits_last=True)
        self.prefilled = [0, 0]
        self.prefilled[stream] = len(tokens) - keep
        self.shared_prefix = 0
        self.active = [stream]
        self.with_logits = (self._context(stream), -1)

    def _prefill_pair(self, with_tokens: List[int], without_tokens: List[int]) -> None:
        keep_with = self._reusable(WITH, with_tokens)
        keep_without = self._reusable(WITHOUT, without_tokens)
        self._forget(WITH, keep_with)
        self._forget(WITHOUT, keep_without)
        decoded = [0, 0]
        shared = min(common_prefix_length(with_tokens, without_tokens), len(with_tokens) - 1,
                     len(without_tokens) - 1)
        if self.shares_prefix and keep_without < shared:
            if keep_with < shared:
                self._decode(WITH, with_tokens[keep_with:shared], logits_last=False)
                decoded[WITH] += shared - keep_with
                keep_with = shared
            self._share(shared)
            keep_without = shared
        self._decode(WITH, with_tokens[keep_with:-1], logits_last=False)
        self._decode(WITHOUT, without_tokens[keep_without:-1], logits_last=False)
        decoded[WITH] += len(with_tokens) - keep_with
        decoded[WITHOUT] += len(without_tokens) - keep_without
        self._step_pair(with_tokens[-1], without_tokens[-1])
        self.prefilled = decoded
        self.shared_prefix = shared if self.shares_prefix else 0
        self.active = [WITH, WITHOUT]

    def step(self, token: int) -> None:
        """Append ``token`` to the active streams and compute their next-token logits."""
        if len(self.active) == 2:
            self._step_pair(token, token)
            return
        stream = self.active[0]
        self._decode(stream, [token], logits_last=True)
        self.with_logits = (self._context(stream), -1)

    @property
    def room(self) -> int:
        """Tokens that can still be appended before an active stream's context is full."""
        return self.n_ctx - max((len(self.cached[s]) for s in self.active), default=0)

    def close(self) -> None:
        self._batch.free()
        self._finalizer()


class BatchedStreams(StreamPair):
    mode = "batched"
    shares_prefix = True

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_threads: int):
        super().__init__(model, n_ctx=n_ctx, n_threads=n_threads)
        # Unified cache sized for both streams at full length; the shared prefix is stored once.
        self.ctx = self._new_context(n_ctx=2 * n_ctx, n_batch=N_BATCH, n_ubatch=N_UBATCH, n_threads=n_threads,
                                     n_seq_max=2, kv_unified=True)

    def _context(self, stream):
        return self.ctx

    def _seq(self, stream):
        return stream

    def _share(self, upto):
        # Metadata-only in a unified cache: seq 1 gets seq 0's cells for positions [len(seq 1), upto).
        start = len(self.cached[WITHOUT])
        llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(self.ctx), WITH, WITHOUT, start, upto)
        self.cached[WITHOUT].extend(self.cached[WITH][start:upto])

    def _step_pair(self, token_with, token_without):
        b = self._batch
        b.clear()
        b.add(token_with, len(self.cached[WITH]), WITH, True)
        b.add(token_without, len(self.cached[WITHOUT]), WITHOUT, True)
        self._run(self.ctx, b)
        self.cached[WITH].append(token_with)
        self.cached[WITHOUT].append(token_without)
        self.with_logits = (self.ctx, 0)
        self.without_logits = (self.ctx, 1)

    def close(self):
        super().close()
        self.ctx = None


class ContextStreams(StreamPair):
    mode = "contexts"

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_threads: int):
        super().__init__(model, n_ctx=n_ctx, n_threads=n_threads)
        self.contexts = [self._new_context(n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_UBATCH, n_threads=n_threads),
                         None]  # the without-stream's context is created on first steered use

    def _context(self, stream):
        return self.contexts[stream]

    def _seq(self, stream):
        return 0

    def _prefill_pair(self, with_tokens, without_tokens):
        if self.contexts[WITHOUT] is None:
            self.contexts[WITHOUT] = self._new_context(n_ctx=self.n_ctx, n_batch=N_BATCH, n_ubatch=N_UBATCH,
                                                            n_threads=self.n_threads)
        super()._prefill_pair(with_tokens, without_tokens)

    def _step_pair(self, token_with, token_without):
        self._decode(WITH, [token_with], logits_last=True)
        self._decode(WITHOUT, [token_without], logits_last=True)
        self.with_logits = (self.contexts[WITH], -1)
        self.without_logits = (self.contexts[WITHOUT], -1)

    def close(self):
        super().close()
        self.contexts = [None, None]


def _free_contexts(contexts: List[object]) -> None:
    while contexts:
        llama_cpp.llama_free(contexts.pop())


def make_streams(mode: str, model: GGUFModel, *, n_ctx: int, n_threads: int) -> StreamPair:
    if mode == "batched":
        return BatchedStreams(model, n_ctx=n_ctx, n_threads=n_threads)
    if mode == "contexts":
        return ContextStreams(model, n_ctx=n_ctx, n_threads=n_threads)
    raise InputError(f"unknown streams mode {mode!r} (choose from {', '.join(STREAM_MODES)})")
