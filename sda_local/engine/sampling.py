"""One request's sampler: a llama.cpp sampler chain, and how it reads the request's logit rows.

* SDA, native: [sda (fusion + temperature, libsda), (EOG ban), nucleus (top-p + seeded draw, libsda)]; the
  sda sampler reads both rows in place (``sda_sampler_set_rows``), so sampling is one C call and cur_p is
  written once. The nucleus sampler keeps the set llama.cpp's top-p keeps without sorting the vocabulary.
* SDA, numpy fusion (``fusion_backend="numpy"``): fusion in numpy, then the same [(EOG ban), nucleus].
* Plain: [guard (refuses NaN/+inf rows, libsda), (EOG ban), nucleus at temperature t0].
* Observed (the pipeline's first answer): the plain chain on the without-instruction row, and each sampled
  token's log-probability under both raw rows recorded, for the self judge's r.
* Without libsda at all: llama.cpp's own temp, top-p and dist in place of the nucleus, and the rows are
  checked in numpy.
* Greedy grammar (the local judge): [grammar, greedy], the row checked in numpy (the grammar sampler
  indexes tokens by id, so the guard, which hands the chain a -1 candidate, cannot go in front of it).
* Inspected (a grammar to follow, or logprobs to report; SDA or plain): the distribution is built in numpy
  (the numpy fusion, or the row at t0), then [grammar, (EOG ban)] masks it, the log-probabilities reported
  are read off it (before top-p's cut, as llama-server's ``n_probs``), and [nucleus at temperature 1] draws
  from it. So the grammar applies after the fusion. Without logprobs, a grammar is checked as llama.cpp's
  common sampler checks it: the unmasked draw is kept when the grammar allows it, else the masked
  distribution is drawn from (with top-p < 1 that is a mixture of the two nuclei, as there).

The head sampler goes first: it must see every raw logit, to refuse a non-finite row before anything
samples it. A native head that meets one hands back LLAMA_TOKEN_NULL (-1), so the per-token cost of the
check is one integer comparison.
"""

from __future__ import annotations

import ctypes
import time
from typing import Optional, Tuple

import numpy as np
from scipy.special import log_softmax, logsumexp

from ..errors import InputError, ModelError
from ..models.gguf import GGUFModel
from . import llama, native
from .fusion import (
    INJECTION_VALUES,
    TEMPERATURE_MODES,
    LogitInjection,
    NonFiniteLogitsError,
    fuse_numpy,
    generation_stopped,
    nonfinite_value,
)
from .llama import TOKEN_DATA, SamplerChain
from .requests import GenerationRequest, TokenInfo
from .steering import EchoTracker, fuse_steered_numpy

RowPointer = llama.Row  # (llama_context, output index) for llama_get_logits_ith


class RequestSampler:
    """Samples one request's tokens. ``sample(with_row, without_row)`` takes the rows' (context, output
    index); ``without_row`` is None for plain generation. Raises NonFiniteLogitsError (a ModelError) on a
    NaN/+inf row. ``lib``: libsda, or None when it is not loaded; ``numpy_fusion``: fuse in numpy even so.
    ``injection``: TEST ONLY (fusion.logit_injection_from_env)."""

    def __init__(self, model: GGUFModel, lib: Optional[ctypes.CDLL], request: GenerationRequest,
                 injection: Optional[LogitInjection] = None, *, numpy_fusion: bool = False):
        self.model, self.lib, self.request, self.injection = model, lib, request, injection
        self.steps = 0
        self.sampling_seconds = 0.0  # inside sample(): the fusion and the whole chain
        self.first_logits: Optional[Tuple[np.ndarray, Optional[np.ndarray]]] = None
        self._totals = [0.0, 0.0, 0.0]  # sum of JS, sum of T, fusion seconds (numpy path)
        self._sda = None
        self._head = None
        self._candidates = None
        self.backend: Optional[str] = None  # the fusion's: "native", "numpy", or None (plain generation)
        self.last: Optional[TokenInfo] = None  # the last token's figures, when the request asks for them
        self._pre = None  # the inspected path's masks, applied before the logprobs are read
        self.chain: Optional[SamplerChain] = None
        r = request
        self._wants_info = r.logprobs is not None or (r.token_stats and r.fused)
        self._observed = [0.0, 0]  # observed: sum of log p_with - log p_without, tokens counted
        self._echo = None  # the numpy fusion's echo guard (the native sampler keeps its own)
        if r.greedy:
            self.chain = SamplerChain([_grammar(model, r.grammar), llama.greedy()])
            self._sample = self._sample_row_checked
            return
        if r.inspected:
            self._init_inspected(model, lib, r)
            return
        samplers: list = []  # made here, not yet owned by a chain: freed if a later one cannot be made
        try:
            self._samplers(model, lib, r, numpy_fusion, samplers)
        except BaseException:
            for sampler in samplers:
                llama.free_sampler(sampler)
            raise
        self.chain = SamplerChain(samplers)  # owns them from here, also if it fails
        if injection is not None and self._head is not None:
            native.inject_fault(lib, self._head, INJECTION_VALUES[injection.value], injection.step, injection.row)

    def _samplers(self, model: GGUFModel, lib, r: GenerationRequest, numpy_fusion: bool, samplers: list) -> None:
        """Make the chain's samplers, appending each to ``samplers`` as soon as it exists."""
        if r.fused:
            native_fusion = lib is not None and not numpy_fusion
            self.backend = "native" if native_fusion else "numpy"
            if native_fusion:
                params = native.make_params(r.strength, r.k, r.t0, TEMPERATURE_MODES[r.temperature_mode])
                self._sda = self._head = native.sampler_init(lib, params, model.n_vocab, None, -1)
                samplers.append(self._head)
                if not r.steering.is_paper:
                    native.set_steering(lib, self._sda, r.steering, r.guard)
                self._sample = self._sample_native_sda
            else:
                self._sample = self._sample_numpy
                self._echo = EchoTracker.of(r.guard, r.steering.echo_run) if r.guard.sources else None
        else:
            if lib is not None:
                self._head = native.guard_sampler_init(lib)
                samplers.append(self._head)
                self._sample = self._sample_native
            else:
                self._sample = self._sample_row_checked
        if r.ignore_eos:
            samplers.append(_eog_ban(model))
        if r.observe:
            self._plain_sample, self._sample = self._sample, self._sample_observed
        # Plain generation samples at T0; SDA's head already applied its temperature.
        temperature = 1.0 if r.fused else r.t0
        if lib is not None:  # temperature, top-p and the draw without a pass each nor sorting the vocabulary
            samplers.append(native.nucleus_sampler_init(lib, r.top_p, r.seed, temperature))
        else:
            if not r.fused:
                samplers.append(llama.temperature(temperature))
            samplers += [llama.top_p(r.top_p), llama.draw(r.seed)]

    def _init_inspected(self, model: GGUFModel, lib, r: GenerationRequest) -> None:
        masks = [_grammar(model, r.grammar)] if r.grammar is not None else []
        if r.ignore_eos:
            masks.append(_eog_ban(model))
        self._pre = SamplerChain(masks) if masks else None
        self._one = np.zeros(1, dtype=TOKEN_DATA) if masks else None  # _allowed's single candidate
        if lib is not None:
            self.chain = SamplerChain([native.nucleus_sampler_init(lib, r.top_p, r.seed, 1.0)])
        else:
            self.chain = SamplerChain([llama.top_p(r.top_p), llama.draw(r.seed)])
        if r.fused:
            self.backend = "numpy"
            self._echo = EchoTracker.of(r.guard, r.steering.echo_run) if r.guard.sources else None
        self._sample = self._sample_inspected

    # -- public ---------------------------------------------------------------------------------------
    def sample(self, with_row: RowPointer, without_row: Optional[RowPointer]) -> int:
        self.steps += 1
        if self.request.capture_logits and self.first_logits is None:
            self.first_logits = (self._row(with_row).copy(),
                                 self._row(without_row).copy() if without_row is not None else None)
        started = time.perf_counter()
        token = self._sample(with_row, without_row)
        self.sampling_seconds += time.perf_counter() - started
        return token

    def fusion_totals(self, n_steps: int) -> Optional[Tuple[float, float, float, Optional[int]]]:
        """(mean JS, mean temperature, fusion microseconds per token, steps fused in place or None for the numpy
        fusion) over ``n_steps`` sampling steps."""
        if not self.request.fused or n_steps == 0:
            return None
        if self._sda is not None:  # the native sampler keeps its own totals
            s = native.sampler_stats(self.lib, self._sda)
            if s.n_steps != n_steps:
                raise ModelError("the SDA sampler did not receive the without-instruction logits")
            totals, in_place = (s.sum_js, s.sum_temperature, s.fusion_seconds), s.n_in_place
        else:
            totals, in_place = self._totals, None
        return totals[0] / n_steps, totals[1] / n_steps, totals[2] / n_steps * 1e6, in_place

    def free(self) -> None:
        if self._pre is not None:
            self._pre.close()
            self._pre = None
        if self.chain is not None:
            self.chain.close()  # frees the samplers it holds, the head included
            self.chain = None

    # -- the variants ---------------------------------------------------------------------------------
    def _row(self, row: RowPointer) -> np.ndarray:
        return llama.logits_row(row, self.model.n_vocab)

    def _refused(self) -> ModelError:
        fault = native.sampler_fault(self.lib, self._head)
        if fault is None:  # not ours: llama.cpp's chain sampled nothing
            return ModelError("the sampler chain returned no token; generation stopped")
        value, row, at = fault
        if self.request.observe:  # the chain samples the without-instruction row
            return generation_stopped(value, "without", at)
        return generation_stopped(value, row if self.request.fused else None, at)

    def _sample_native_sda(self, with_row, without_row) -> int:
        self.lib.sda_sampler_set_rows(self._sda, *with_row, *without_row)
        token = self.chain.sample(with_row)
        if token < 0:
            raise self._refused()
        if self._wants_info:  # token_stats: the native sampler's figures of this step
            s = native.sampler_stats(self.lib, self._sda)
            self.last = TokenInfo(token, js=float(s.last_js), temperature=float(s.last_temperature),
                                  prompt_top=int(np.argmax(self._row(with_row))))
        return token

    def _sample_observed(self, with_row, without_row) -> int:
        """The plain chain on the without-instruction row; the token's log-probability under both raw rows."""
        token = self._plain_sample(without_row, None)
        if not self.model.is_eog(token):  # the self judge's r is over the answer's tokens, as its forcing was
            z_with, z_without = self._row(with_row), self._row(without_row)
            norm_with = self._log_sum_exp(z_with)  # +inf / NaN when the row holds one (the chain checked the other)
            if not -np.inf < norm_with < np.inf:  # a fault, or no token possible at all
                raise generation_stopped(nonfinite_value(z_with) or "-inf", "with", self.steps)
            # log softmax(row)[token] for both rows, in float64 from float32 norms, as forcing.log_softmax_at
            # computes them (there with scipy's float32 sum: the observed and forced r agree to ~1e-6).
            self._observed[0] += ((float(z_with[token]) - norm_with)
                                  - (float(z_without[token]) - self._log_sum_exp(z_without)))
            self._observed[1] += 1
        return token

    def _log_sum_exp(self, row: np.ndarray) -> float:
        """One float32 log-sum-exp of a row: libsda's (two SIMD passes, no copy) or, without it, scipy's."""
        if self.lib is not None:
            return native.log_sum_exp(self.lib, row)
        return float(logsumexp(row))

    def observed_log_ratio(self) -> Optional[float]:
        """Observed: the mean of log p_with - log p_without over the answer's tokens (None before any)."""
        total, n = self._observed
        return total / n if n else None

    def _sample_native(self, with_row, without_row) -> int:
        token = self.chain.sample(with_row)
        if token < 0:
            raise self._refused()
        return token

    def _injected(self, row: np.ndarray, which: str) -> np.ndarray:
        """TEST ONLY: the row with logit 0 overwritten at the injection's step (a copy: llama.cpp's stays)."""
        inj = self.injection
        if inj is None or inj.step != self.steps or inj.row != which:
            return row
        row = row.copy()
        row[0] = float(inj.value)
        return row

    def _checked_row(self, with_row) -> np.ndarray:
        """The with-row, refused (NonFiniteLogitsError) when it holds a NaN or +inf."""
        row = self._injected(self._row(with_row), "with")
        value = nonfinite_value(row)
        if value is not None:
            raise generation_stopped(value, None, self.steps)
        return row

    def _sample_row_checked(self, with_row, without_row) -> int:
        self._checked_row(with_row)
        return self.chain.sample(with_row)

    def _fuse_numpy(self, with_row, without_row):
        """(fused log-probs, temperature, js, raw with-row) of this step, the numpy fusion's."""
        r = self.request
        z_with = self._injected(self._row(with_row), "with")
        z_without = self._injected(self._row(without_row), "without")
        started = time.perf_counter()
        try:
            if r.steering.is_paper:
                fused, temperature, js = fuse_numpy(z_with, z_without, r.strength, k=r.k, t0=r.t0,
                                                    temperature_mode=r.temperature_mode)
            else:
                # The first ``onset`` tokens are prompting's (a = 0): the answer starts on the query's subject.
                strength = r.strength if self.steps > r.steering.onset else 0.0
                guarded = self._echo.guarded() if self._echo is not None else None
                fused, temperature, js = fuse_steered_numpy(z_with, z_without, strength, r.steering, guarded,
                                                            k=r.k, t0=r.t0, temperature_mode=r.temperature_mode,
                                                            capped=r.guard.capped, forbidden=r.guard.forbidden)
        except NonFiniteLogitsError as exc:
            raise generation_stopped(exc.value, exc.row, self.steps) from None
        self._totals[0] += js
        self._totals[1] += temperature
        self._totals[2] += time.perf_counter() - started
        return fused, temperature, js, z_with

    def _candidates_of(self, logits: np.ndarray) -> np.ndarray:
        n = self.model.n_vocab
        if self._candidates is None:
            self._candidates = np.zeros(n, dtype=TOKEN_DATA)
            self._token_ids = np.arange(n, dtype=np.int32)
        cand = self._candidates
        cand["id"] = self._token_ids  # top-p reorders the array in place
        cand["logit"] = logits
        return cand

    def _draw(self, cand: np.ndarray) -> int:
        token = self.chain.apply(cand)
        if token < 0:
            raise ModelError("the sampler chain selected no token; generation stopped")
        return token

    def _accept(self, token: int) -> None:
        self.chain.accept(token)
        if self._pre is not None:
            self._pre.accept(token)
        if self._echo is not None:
            self._echo.accept(token)

    def _allowed(self, token: int) -> bool:
        """Whether the masks (the grammar) let ``token`` through: one candidate instead of the vocabulary."""
        one = self._one
        one["id"], one["logit"] = token, 0.0
        self._pre.apply(one)
        return bool(np.isfinite(one["logit"][0]))

    def _sample_numpy(self, with_row, without_row) -> int:
        fused, temperature, js, z_with = self._fuse_numpy(with_row, without_row)
        token = self._draw(self._candidates_of(fused))
        self._accept(token)
        if self._wants_info:
            self.last = TokenInfo(token, js=js, temperature=temperature, prompt_top=int(np.argmax(z_with)))
        return token

    def _sample_inspected(self, with_row, without_row) -> int:
        r = self.request
        js = temperature = prompt_top = None
        if r.fused:
            logits, temperature, js, z_with = self._fuse_numpy(with_row, without_row)
            prompt_top = int(np.argmax(z_with))
        else:
            logits = self._checked_row(with_row) / np.float32(r.t0)
        cand = self._candidates_of(logits)
        token, log_probs = None, None
        if self._pre is not None and r.logprobs is None:
            # llama.cpp's common sampler does the same: draw unmasked and keep the token if the grammar allows
            # it (masking the whole vocabulary costs milliseconds a token); else mask, then draw again.
            token = self._draw(cand)
            if not self._allowed(token):
                cand = self._candidates_of(logits)
                token = None
        if token is None:
            if self._pre is not None:  # the grammar's and the EOG ban's masks (-inf), in place, order kept
                self._pre.apply(cand)
                if np.isneginf(cand["logit"]).all():  # e.g. a finished grammar with EOS banned
                    raise ModelError("the grammar allows no token here; generation stopped")
            if r.logprobs is not None:
                with np.errstate(invalid="ignore", divide="ignore"):  # masked tokens: -inf, as they should be
                    log_probs = log_softmax(cand["logit"].astype(np.float64))
            token = self._draw(cand)
        self._accept(token)
        if self._wants_info:
            info = TokenInfo(token, js=js, temperature=temperature, prompt_top=prompt_top)
            if log_probs is not None:
                info.logprob = float(log_probs[token])
                info.top = _best(log_probs, r.logprobs)
            self.last = info
        return token


def _best(log_probs: np.ndarray, n: int):
    """The ``n`` most likely (token, log-prob), best first (ties: the lower id), without sorting the vocabulary;
    tokens a grammar masked (-inf) are never among them, so there may be fewer than ``n``."""
    if n <= 0:
        return ()
    ids = np.argpartition(-log_probs, n - 1)[:n]
    ids = ids[np.lexsort((ids, -log_probs[ids]))]
    return tuple((int(i), float(log_probs[i])) for i in ids if np.isfinite(log_probs[i]))


def _grammar(model: GGUFModel, grammar: str):
    sampler = llama.grammar(model, grammar)
    if sampler is None:
        raise InputError("invalid grammar")
    return sampler


def check_grammar(model: GGUFModel, grammar: str) -> None:
    """Raise InputError unless llama.cpp parses ``grammar`` (GBNF, rule ``root``)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise InputError("the grammar is empty")
    llama.free_sampler(_grammar(model, grammar))


def _eog_ban(model: GGUFModel):
    return llama.ban(model.n_vocab, model.eog_tokens())
