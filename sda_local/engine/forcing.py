"""Teacher forcing: log-probabilities of given tokens, for the judges that read a model's distribution
instead of sampling from it (expected-value scoring and the self judge).

``ForcingContext`` owns one llama_context on the model's weights with two sequences in a unified cache, so
the self judge's two prompts (with and without the instruction) go through one batched prefill. Its batches
cut prompts into ubatches as the generation streams do (the engine's layout.BatchPolicy), so that
forced log-probabilities equal those of generation. Nothing here samples, and nothing depends on what was decoded before: every
call starts from an empty cache.
"""

from __future__ import annotations

import threading
from typing import List, Sequence, Tuple

import numpy as np
from scipy.special import logsumexp

from ..errors import ContextOverflowError, ModelError
from .fusion import NonFiniteLogitsError, nonfinite_value
from ..models.gguf import GGUFModel
from .layout import EXACT, N_BATCH, BatchPolicy, common_prefix_length
from .llama import Batch, Context

N_SEQ = 2
# Cells per sequence the context starts with: what a judged first answer and its prompt take. A longer input
# grows it (up to n_ctx), so the judges do not hold a second full-size KV cache beside the slots' for nothing.
START_CELLS = 1024


class ForcingContext:
    """Decodes token sequences and reads the log-probabilities the model gives to chosen tokens.

    ``n_ctx`` is the most a sequence may hold; the context starts with ``min(n_ctx, START_CELLS)`` cells a
    sequence (``capacity``) and is made again, larger, when an input needs more (what its sequences held is
    decoded again there)."""

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_threads: int, compute_lock=None, kv=None,
                 batching: BatchPolicy = EXACT):
        self.model = model
        self._compute_lock = compute_lock or threading.Lock()  # shared with the engine's scheduler
        self._user = threading.RLock()  # one judge at a time: a judgement is a series of calls
        self._closing = False  # set by close(): a judgement still running stops at its next decode
        self.n_ctx = n_ctx
        self._n_threads, self._kv, self._batching = n_threads, kv, batching
        self.capacity = min(n_ctx, START_CELLS)
        self.ctx = self._new_context(self.capacity)
        self._batch = Batch(N_BATCH)
        self._lengths = [0] * N_SEQ  # tokens in each sequence's cache
        self._tokens: List[List[int]] = [[] for _ in range(N_SEQ)]  # those tokens, to decode them again on growth
        # TEST ONLY (fusion.logit_injection_from_env): overwrite logit 0 of the first part's STEP-th row (the
        # last row when it has fewer) before the non-finite check, in every decode.
        self.injection = None

    def __enter__(self) -> "ForcingContext":
        self._user.acquire()
        if self._closing:  # close() got here first: the context is gone
            self._user.release()
            raise ModelError("the engine is closing")
        return self

    def __exit__(self, *exc) -> None:
        self._user.release()

    # -- decoding -----------------------------------------------------------------------------------
    def _live(self):
        """The context, or ModelError once close() has begun (a judgement left running stops here)."""
        if self._closing or self.ctx is None:
            raise ModelError("the engine is closing")
        return self.ctx

    def _new_context(self, cells: int) -> Context:
        return Context(self.model, n_ctx=N_SEQ * cells, n_batch=N_BATCH, n_ubatch=self._batching.n_ubatch,
                       n_threads=self._n_threads, n_seq_max=N_SEQ, kv_unified=True, kv=self._kv)

    def clear(self) -> None:
        self._live().clear()
        self._lengths = [0] * N_SEQ
        self._tokens = [[] for _ in range(N_SEQ)]

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length of a sequence (to try another branch after a shared prefix)."""
        self._live().forget(seq, length)
        self._lengths[seq] = min(self._lengths[seq], length)
        del self._tokens[seq][length:]

    def _make_room(self, parts) -> None:
        needed = [self._lengths[seq] for seq in range(N_SEQ)]
        for seq, tokens, _ in parts:
            needed[seq] += len(tokens)
        most = max(needed)
        if most > self.n_ctx:
            raise ContextOverflowError(f"the judged text is {most} tokens but the judge's context holds "
                                       f"{self.n_ctx} (raise --n-ctx)")
        if most > self.capacity:
            self._grow(min(self.n_ctx, max(most, 2 * self.capacity)))

    def reserve(self, n_tokens: int) -> None:
        """Make room for sequences of ``n_tokens`` now (a judgement that knows its size calls it first)."""
        self._make_room([(0, [0] * max(0, n_tokens - self._lengths[0]), 0)])

    def _grow(self, cells: int) -> None:
        """A context of ``cells`` a sequence in place of this one, holding what this one held."""
        old = self._live()
        self.ctx, self.capacity = self._new_context(cells), cells
        old.close()
        held = self._tokens
        self._lengths, self._tokens = [0] * N_SEQ, [[] for _ in range(N_SEQ)]
        self.decode([(seq, tokens, 0) for seq, tokens in enumerate(held) if tokens])

    def decode(self, parts: Sequence[Tuple[int, Sequence[int], int]]) -> List[np.ndarray]:
        """Append tokens to sequences and return, per part, the logit rows of its last ``n_rows`` tokens
        (the distributions that follow them), as one (n_rows, n_vocab) float32 array each (copies).

        ``parts``: (sequence, tokens, n_rows). All parts go through the same batches, so two sequences'
        prompts are one prefill."""
        self._make_room(parts)
        entries = []  # (token, pos, seq, part index or -1)
        for index, (seq, tokens, n_rows) in enumerate(parts):
            start = self._lengths[seq]
            first_row = len(tokens) - n_rows
            for i, token in enumerate(tokens):
                entries.append((token, start + i, seq, index if i >= first_row else -1))
            self._lengths[seq] += len(tokens)
            self._tokens[seq].extend(tokens)
        rows: List[List[np.ndarray]] = [[] for _ in parts]
        n_vocab = self.model.n_vocab
        b = self._batch
        for chunk_start in range(0, len(entries), N_BATCH):
            chunk = entries[chunk_start:chunk_start + N_BATCH]
            b.clear()
            owners = []
            for token, pos, seq, owner in chunk:
                b.add(token, pos, seq, owner >= 0)
                if owner >= 0:
                    owners.append(owner)
            ctx = self._live()  # close() waits for this judgement to end: a judgement left running ends here
            try:
                with self._compute_lock:
                    ctx.decode(b)
            except ModelError:
                self.clear()
                raise
            if owners:
                # Output rows are contiguous, in batch order.
                out = self._live().logits(len(owners))
                owners_arr = np.asarray(owners)
                for owner in np.unique(owners_arr):
                    rows[owner].append(out[owners_arr == owner].copy())
        result = []
        for index, (part_rows, (_, _, n_rows)) in enumerate(zip(rows, parts)):
            block = np.concatenate(part_rows) if part_rows else np.zeros((0, n_vocab), np.float32)
            assert len(block) == n_rows
            if self.injection is not None and index == 0 and n_rows:  # TEST ONLY
                block[min(self.injection.step, n_rows) - 1, 0] = float(self.injection.value)
            value = nonfinite_value(block) if len(block) else None
            if value is not None:
                raise NonFiniteLogitsError(value, "with", f"the model produced non-finite logits ({value}) "
                                                          "while judging")
            result.append(block)
        return result

    # -- what the judges ask ------------------------------------------------------------------------
    def next_logprobs(self, tokens: Sequence[int], ids: Sequence[int], *, seq: int = 0) -> np.ndarray:
        """log p(id | tokens) for each id, over the full vocabulary (float64), from an empty sequence."""
        self.truncate(seq, 0)
        (row,) = self.decode([(seq, tokens, 1)])
        return log_softmax_at(row, [ids])[0]

    def branch_logprobs(self, seq: int, keep: int, branch: Sequence[int], ids: Sequence[int]) -> np.ndarray:
        """log p(id | the first ``keep`` tokens of ``seq`` + ``branch``): the sequence is cut back to ``keep``
        first, so branches of one prefix are tried one after the other without decoding the prefix again."""
        self.truncate(seq, keep)
        (row,) = self.decode([(seq, branch, 1)])
        return log_softmax_at(row, [ids])[0]

    def continuation_logprobs(self, prompts: Sequence[Sequence[int]], continuation: Sequence[int]) -> List[np.ndarray]:
        """log p(continuation[i] | prompt + continuation[:i]) for each prompt (at most N_SEQ), in one batched
        prefill, from empty sequences."""
        if not continuation:
            return [np.zeros(0) for _ in prompts]
        for seq in range(N_SEQ):  # the unused one too: nothing stale is carried into a growth
            self.truncate(seq, 0)
        # Grown before anything is decoded, so the shared prefix stays one decode and the numbers never depend
        # on whether an earlier input grew the context.
        self.reserve(max(len(p) for p in prompts) + len(continuation) - 1)
        # The prompts' common prefix (the system prompt and the query, for the self judge) is decoded once
        # and shared: in the unified cache, copying it to the other sequence is metadata only.
        shared = min([common_prefix_length(prompts[0], p) for p in prompts] + [len(p) - 1 for p in prompts])
        if len(prompts) > 1 and shared > 0:
            self.decode([(0, prompts[0][:shared], 0)])
            ctx = self._live()
            for seq in range(1, len(prompts)):
                ctx.share(0, seq, shared)
                self._lengths[seq] = shared
                self._tokens[seq] = list(prompts[0][:shared])
        else:
            shared = 0
        # Row j (that of the token before continuation[j]) predicts continuation[j]; the last continuation
        # token predicts nothing asked for, so it is not decoded.
        parts = [(seq, list(p[shared:]) + list(continuation[:-1]), len(continuation))
                 for seq, p in enumerate(prompts)]
        return [_token_logprobs(block, continuation) for block in self.decode(parts)]

    def close(self) -> None:
        """Free the context once no judgement uses it: one still running (a judge thread left behind by a
        client that went away) fails at its next decode, and close waits for it to let go."""
        self._closing = True
        with self._user:
            self._free()

    def _free(self) -> None:
        ctx, self.ctx = self.ctx, None  # every method ends at _live() from now on
        self._batch.free()
        if ctx is not None:
            ctx.close()


def log_softmax_at(rows: np.ndarray, ids_per_row: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """Per row, log_softmax(row)[ids] in float64 (one float32 logsumexp per row: a float64 copy of a 262k
    vocabulary's rows would cost more than the decode)."""
    norms = logsumexp(rows, axis=1).astype(np.float64)
    return [rows[i, list(ids)].astype(np.float64) - norms[i] for i, ids in enumerate(ids_per_row)]


def _token_logprobs(block: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    norms = logsumexp(block, axis=1).astype(np.float64)
    picked = block[np.arange(len(tokens)), np.asarray(tokens)].astype(np.float64)
    return picked - norms
