"""One request's sampler: a llama.cpp sampler chain, and how it reads the request's logit rows.

* SDA, native: [sda (fusion + temperature, libsda), (EOG ban), nucleus (top-p + seeded draw, libsda)]; the
  sda sampler reads both rows in place (``sda_sampler_set_rows``), so sampling is one C call and cur_p is
  written once. The nucleus sampler keeps the set llama.cpp's top-p keeps without sorting the vocabulary.
* SDA, numpy fusion (``fusion_backend="numpy"``): fusion in numpy, then the same [(EOG ban), nucleus].
* Plain: [guard (refuses NaN/+inf rows, libsda), (EOG ban), nucleus at temperature t0].
* Without libsda at all: llama.cpp's own temp, top-p and dist in place of the nucleus, and the rows are
  checked in numpy.
* Grammar (the local judge): [grammar, greedy], the row checked in numpy (the grammar sampler indexes
  tokens by id, so the guard, which hands the chain a -1 candidate, cannot go in front of it).

The head sampler goes first: it must see every raw logit, to refuse a non-finite row before anything
samples it. A native head that meets one hands back LLAMA_TOKEN_NULL (-1), so the per-token cost of the
check is one integer comparison.
"""

from __future__ import annotations

import ctypes
import math
import time
from typing import Optional, Tuple

import llama_cpp
import numpy as np

from ..errors import InputError, ModelError
from ..gguf_model import GGUFModel
from . import native
from .fusion import (
    INJECTION_VALUES,
    TEMPERATURE_MODES,
    LogitInjection,
    NonFiniteLogitsError,
    fuse_numpy,
    generation_stopped,
    nonfinite_value,
)
from .requests import GenerationRequest
from .steering import EchoTracker, fuse_steered_numpy

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

RowPointer = Tuple[object, int]  # (llama_context, output index) for llama_get_logits_ith


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
        r = request
        if r.grammar is not None:
            if r.steered:
                raise InputError("a grammar constrains plain generation only")
            grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, r.grammar.encode("utf-8"), b"root")
            if not grammar:
                raise InputError("invalid grammar")
            self.chain = _chain([grammar, llama_cpp.llama_sampler_init_greedy()])
            self._sample = self._sample_row_checked
            return
        self._echo = None  # the numpy fusion's echo guard (the native sampler keeps its own)
        if r.steered:
            native_fusion = lib is not None and not numpy_fusion
            self.backend = "native" if native_fusion else "numpy"
            if native_fusion:
                params = native.make_params(r.strength, r.k, r.t0, TEMPERATURE_MODES[r.temperature_mode])
                self._sda = self._head = native.sampler_init(lib, params, model.n_vocab, None, -1)
                if not r.steering.is_paper:
                    native.set_steering(lib, self._sda, r.steering, r.echo_sources)
                self._sample = self._sample_native_sda
            else:
                self._sample = self._sample_numpy
                if r.echo_sources:
                    self._echo = EchoTracker(r.echo_sources, r.steering.echo_run)
        else:
            if lib is not None:
                self._head = native.guard_sampler_init(lib)
                self._sample = self._sample_native
            else:
                self._sample = self._sample_row_checked
        samplers = [self._head] if self._head is not None else []
        if r.ignore_eos:
            eog = model.eog_tokens()
            biases = (llama_cpp.llama_logit_bias * len(eog))(*[(t, -math.inf) for t in eog])
            samplers.append(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(eog), biases))
        # Plain generation samples at T0; SDA's head already applied its temperature.
        temperature = 1.0 if r.steered else r.t0
        if lib is not None:  # temperature, top-p and the draw without a pass each nor sorting the vocabulary
            samplers.append(native.nucleus_sampler_init(lib, r.top_p, r.seed, temperature))
        else:
            if not r.steered:
                samplers.append(llama_cpp.llama_sampler_init_temp(temperature))
            samplers.append(llama_cpp.llama_sampler_init_top_p(r.top_p, 1))
            samplers.append(llama_cpp.llama_sampler_init_dist(r.seed))
        self.chain = _chain(samplers)
        if injection is not None and self._head is not None:
            native.inject_fault(lib, self._head, INJECTION_VALUES[injection.value], injection.step, injection.row)

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
        if not self.request.steered or n_steps == 0:
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
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)  # frees the samplers it holds, the head included
            self.chain = None

    # -- the variants ---------------------------------------------------------------------------------
    def _row(self, row: RowPointer) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(*row), shape=(self.model.n_vocab,))

    def _refused(self) -> ModelError:
        fault = native.sampler_fault(self.lib, self._head)
        if fault is None:  # not ours: llama.cpp's chain sampled nothing
            return ModelError("the sampler chain returned no token; generation stopped")
        value, row, at = fault
        return generation_stopped(value, row if self.request.steered else None, at)

    def _sample_native_sda(self, with_row, without_row) -> int:
        self.lib.sda_sampler_set_rows(self._sda, *with_row, *without_row)
        token = llama_cpp.llama_sampler_sample(self.chain, *with_row)
        if token < 0:
            raise self._refused()
        return token

    def _sample_native(self, with_row, without_row) -> int:
        token = llama_cpp.llama_sampler_sample(self.chain, *with_row)
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

    def _sample_row_checked(self, with_row, without_row) -> int:
        row = self._injected(self._row(with_row), "with")
        value = nonfinite_value(row)
        if value is not None:
            raise generation_stopped(value, None, self.steps)
        return llama_cpp.llama_sampler_sample(self.chain, *with_row)

    def _sample_numpy(self, with_row, without_row) -> int:
        n, r = self.model.n_vocab, self.request
        if self._candidates is None:
            self._candidates = np.zeros(n, dtype=TOKEN_DATA)
            self._token_ids = np.arange(n, dtype=np.int32)
        z_with = self._injected(self._row(with_row), "with")
        z_without = self._injected(self._row(without_row), "without")
        started = time.perf_counter()
        try:
            if r.steering.is_paper:
                fused, temperature, js = fuse_numpy(z_with, z_without, r.strength, k=r.k, t0=r.t0,
                                                    temperature_mode=r.temperature_mode)
            else:
                guarded = self._echo.guarded() if self._echo is not None else None
                fused, temperature, js = fuse_steered_numpy(z_with, z_without, r.strength, r.steering, guarded,
                                                            k=r.k, t0=r.t0, temperature_mode=r.temperature_mode)
        except NonFiniteLogitsError as exc:
            raise generation_stopped(exc.value, exc.row, self.steps) from None
        self._totals[0] += js
        self._totals[1] += temperature
        self._totals[2] += time.perf_counter() - started
        cand = self._candidates
        cand["id"] = self._token_ids  # top-p reorders the array in place
        cand["logit"] = fused
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=n, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        token = arr.data[arr.selected].id
        llama_cpp.llama_sampler_accept(self.chain, token)
        if self._echo is not None:
            self._echo.accept(token)
        return token


def _chain(samplers):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for s in samplers:
        llama_cpp.llama_sampler_chain_add(chain, ctypes.cast(s, llama_cpp.llama_sampler_p_ctypes)
                                          if isinstance(s, int) else s)
    return chain
