"""SDAEngine: loads a GGUF model once and generates with or without SDA steering.

Per query (SPEC.md sections 3-5): the with- and without-instruction prompts are prefilled into two
streams on the same weights; then, every step, llama.cpp's sampler chain [sda, top-p, dist] samples from
the fused distribution and the token is appended to both streams. The per-token path is a handful of C
calls: decode, sample (fusion inside the native sampler), token piece.
"""

from __future__ import annotations

import codecs
import ctypes
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Iterator, List, Optional, Sequence, Tuple

import llama_cpp
import numpy as np

from . import hardware, models, native
from .errors import ContextOverflowError, InputError, ModelError
from .fusion import (
    DEFAULT_K,
    DEFAULT_T0,
    DEFAULT_TOP_P,
    INJECTION_VALUES,
    MIN_TOP_P,
    TEMPERATURE_MODES,
    check_fusion_params,
    NonFiniteLogitsError,
    fuse_numpy,
    generation_stopped,
    logit_injection_from_env,
    nonfinite_value,
)
from .gguf_model import GGUFModel
from .seeds import check_seed
from .prompts import QUESTION_SYSTEM, Alignment, PromptFormatter, check_text, resolve_alignment
from .streams import STREAM_MODES, make_streams

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


@dataclass
class GenerationStats:
    """What one generation did. ``fusion_backend`` is "native", "numpy" or None (plain generation)."""

    mode: str  # "sda" or "plain"
    streams: str
    fusion_backend: Optional[str]
    strength: Optional[float]
    temperature_mode: Optional[str]
    t0: float
    top_p: float
    seed: int
    prompt_tokens_with: int
    prompt_tokens_without: Optional[int]
    shared_prefix_tokens: int
    prefill_tokens_with: int = 0  # prompt tokens actually decoded (the rest was already in the cache)
    prefill_tokens_without: Optional[int] = None
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    tokens_per_second: float = 0.0
    mean_js: Optional[float] = None
    mean_temperature: Optional[float] = None
    fusion_us_per_token: Optional[float] = None
    finish_reason: str = "length"  # "stop" (end-of-generation token), "length" (max_tokens), "context"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]
    stats: GenerationStats
    prompt_with: str = field(repr=False, default="")
    prompt_without: Optional[str] = field(repr=False, default=None)


class GenerationStream:
    """Iterate for text pieces as they are decoded; ``result`` is set once the iteration is complete."""

    def __init__(self, run):
        self._run = run
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._run


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class SDAEngine:
    """One loaded model, two decoding streams, SDA generation.

    ``model``: None (the default catalogue model, fetched on first use), a catalogue name, or a GGUF path.
    ``streams``: "batched" (one context, two sequences, one decode per step) or "contexts" (two contexts
    on the same weights). ``n_ctx`` is the context of each stream (capped at the model's training context,
    with a note in ``notices``). ``fusion_backend``: "auto" (native when libsda loads), "native" or "numpy".
    Fusion runs on host logits, so CPU, CUDA and Metal builds of llama-cpp-python all work; ``n_gpu_layers``
    offloads layers as in llama.cpp. ``repack``: "auto" (llama.cpp's weight repacking, except on Intel AMX
    CPUs where its AMX kernels crash), "on" or "off"; None reads $SDA_LOCAL_REPACK, else "auto".
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        n_ctx: int = 4096,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        streams: str = "batched",
        verbose: bool = False,
        fusion_backend: str = "auto",
        repack: Optional[str] = None,
    ):
        if streams not in STREAM_MODES:
            raise InputError(f"unknown streams mode {streams!r} (choose from {', '.join(STREAM_MODES)})")
        if not isinstance(n_ctx, int) or n_ctx < 16:
            raise InputError(f"n_ctx must be an integer >= 16, got {n_ctx!r}")
        if fusion_backend not in ("auto", "native", "numpy"):
            raise InputError(f"unknown fusion backend {fusion_backend!r} (choose from auto, native, numpy)")
        repack = hardware.check_repack(repack)
        self.model_path = models.resolve(model)
        self.model = GGUFModel(self.model_path, n_gpu_layers=n_gpu_layers, verbose=verbose, repack=repack)
        self.repack = repack
        self.notices: List[str] = []  # one-line notes for the user (the CLI prints them)
        if 0 < self.model.n_ctx_train < n_ctx:
            self.notices.append(f"n_ctx {n_ctx} is beyond the model's training context; "
                                f"capped at {self.model.n_ctx_train}")
            n_ctx = self.model.n_ctx_train
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _default_threads()
        self.streams = make_streams(streams, self.model, n_ctx=n_ctx, n_threads=self.n_threads)
        self.formatter = PromptFormatter(self.model.chat_template, self.model.bos_token, self.model.eos_token)
        self._native = None if fusion_backend == "numpy" else native.library()
        if fusion_backend == "native" and self._native is None:
            raise InputError(f"the native fusion library is not loaded: {native.load_error()}")
        self._candidates: Optional[np.ndarray] = None  # numpy-fallback token array, allocated on first use
        self._aux_streams = None  # for the local judge's greedy completions, created on first use
        self._forcing = None  # for the judges that read distributions (expected, self), created on first use
        self._logit_injections = None  # TEST ONLY (see fusion.logit_injection_from_env), read on first use

    @property
    def _add_bos(self) -> bool:
        # Chat templates write their own special tokens (BOS included), as llama-cpp-python assumes too.
        return self.model.add_bos and not self.formatter.uses_chat_template

    @property
    def fusion_backend(self) -> str:
        return "native" if self._native is not None else "numpy"

    # -- public API ---------------------------------------------------------------------------------
    def generate(self, query: str, instruction: Optional[str] = None, **options) -> GenerationResult:
        """Generate an answer; see ``stream`` for the options. Returns text, tokens and stats."""
        stream = self.stream(query, instruction, **options)
        for _ in stream:
            pass
        return stream.result

    def stream(
        self,
        query: str,
        instruction: Optional[str] = None,
        *,
        strength: float = 0.5,
        max_tokens: int = 256,
        t0: float = DEFAULT_T0,
        top_p: float = DEFAULT_TOP_P,
        temperature_mode: str = "paper",
        seed: Optional[int] = None,
        system: Optional[str] = None,
        k: float = DEFAULT_K,
        ignore_eos: bool = False,
        history: Sequence[Tuple[str, str]] = (),
        keep_cache: bool = False,
    ) -> GenerationStream:
        """Generate, yielding text pieces as they are decoded.

        ``instruction``: a preset name (helpfulness, harmlessness, honesty, empathy, summarization), any
        instruction text, or None for plain generation (one stream at temperature ``t0`` with top-p).
        ``strength`` is the amplifier a of SPEC.md (0 = prompting with the instruction). ``history``: earlier
        (user, assistant) turns of a conversation. With a history (or ``keep_cache=True``) the KV caches
        keep what the previous call left and only new tokens are prefilled; otherwise the call starts
        from empty caches and its result depends on its arguments alone. (llama.cpp's attention over an
        F16 cache rounds differently when the same cells sit in another order, so reused caches can shift
        logits slightly.)
        """
        check_text("query", query)
        alignment = resolve_alignment(check_text("instruction", instruction), system) if instruction is not None else None
        if system is not None:
            check_text("system prompt", system)
        check_fusion_params(strength, k, t0, temperature_mode)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and MIN_TOP_P <= top_p <= 1.0):
            raise InputError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {top_p!r}")
        if seed is None:
            seed = secrets.randbelow(2**31)
        else:
            seed = check_seed(seed)
        history = [(check_text("history user turn", u), str(a)) for u, a in history]
        run = self._run(query, alignment, system, float(strength), max_tokens, float(t0), float(top_p),
                        temperature_mode, seed, float(k), ignore_eos, history, keep_cache or bool(history))
        return GenerationStream(run)

    def align(self, query: str, align: str, **options):
        """The full SDA pipeline (initial answer, judge, amplifier, SDA answer); see ``align_stream``."""
        stream = self.align_stream(query, align, **options)
        for _ in stream:
            pass
        return stream.result

    def align_stream(self, query: str, align: str, *, judge="self", **options):
        """Like ``align`` but yields the SDA answer's text pieces; ``.result`` is an AlignmentResult.

        ``judge``: "self" (the default: this engine's likelihood ratio), "local" (this engine's model scores
        under a rubric), "local:PATH|NAME", "openai[:MODEL]", "none"/None, or a judge object (SelfJudge,
        LocalJudge, RemoteJudge). Options: ``strength`` (skips the judge), ``amplifier_map``,
        ``on_judge_failure`` ("error", "fixed:A", "prompt-only"), ``on_warning`` (callable) and every
        option of ``stream``.
        """
        from .judging import make_judge
        from .pipeline import align_stream

        if not isinstance(judge, str):
            return align_stream(self, query, align, judge=judge, **options)
        judge_obj = make_judge(judge, self)  # made here, so closed here: when the stream ends
        on_close = judge_obj.close if judge_obj is not None else None
        try:
            return align_stream(self, query, align, judge=judge_obj, on_close=on_close, **options)
        except BaseException:
            if on_close is not None:
                on_close()
            raise

    def prompt_lengths(self, query: str, instruction: Optional[str], history: Sequence[Tuple[str, str]] = (), *,
                       system: Optional[str] = None) -> Tuple[int, int]:
        """Prompt tokens of (with-instruction, without-instruction) streams; equal without an instruction."""
        alignment = resolve_alignment(instruction, system) if instruction is not None else None
        if alignment is None:
            n = len(self.model.tokenize(self.formatter.render(system or QUESTION_SYSTEM, query, history),
                                        add_bos=self._add_bos))
            return n, n
        prompts = self.formatter.pair(query, alignment, history)
        return tuple(len(self.model.tokenize(p, add_bos=self._add_bos)) for p in prompts)

    def logits(self, query: str, instruction: Optional[str], *, system: Optional[str] = None,
               history: Sequence[Tuple[str, str]] = ()):
        """Raw next-token logits of the first answer token: (with instruction, without instruction), copies."""
        alignment = resolve_alignment(check_text("instruction", instruction), system)
        if alignment is None:
            raise InputError("logits() needs an instruction")
        prompt_with, prompt_without = self.formatter.pair(check_text("query", query), alignment, history)
        if not history:
            self.streams.reset()
        self.streams.prefill(self.tokenize_prompt(prompt_with), self.tokenize_prompt(prompt_without))
        n = self.model.n_vocab
        rows = []
        for ctx, idx in (self.streams.with_logits, self.streams.without_logits):
            rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(n,)).copy())
        return rows[0], rows[1]

    def forcing(self):
        """The teacher-forcing context on this engine's weights (forcing.ForcingContext), made on first use."""
        if self.model is None:
            raise ModelError("the engine is closed")
        if self._forcing is None:
            from .forcing import ForcingContext

            self._forcing = ForcingContext(self.model, n_ctx=self.n_ctx, n_threads=self.n_threads)
            self._forcing.injection = next((i for i in self._injections() if i.seed is None and i.row == "with"),
                                           None)
        return self._forcing

    def reset_caches(self) -> None:
        """Empty every KV cache, so that what comes next does not depend on what came before (bit for bit:
        reused caches can hold the same cells in another order, which changes float rounding)."""
        for streams in (self.streams, self._aux_streams):
            if streams is not None:
                streams.reset()

    def close(self) -> None:
        if getattr(self, "_forcing", None) is not None:
            self._forcing.close()
            self._forcing = None
        if getattr(self, "_aux_streams", None) is not None:
            self._aux_streams.close()
            self._aux_streams = None
        if getattr(self, "streams", None) is not None:
            self.streams.close()
            self.streams = None
        if getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str) -> List[int]:
        """A rendered prompt's tokens (special tokens parsed); refuses one that fills the context."""
        tokens = self.model.tokenize(prompt, add_bos=self._add_bos, special=True)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx} (raise --n-ctx)"
            )
        return tokens

    def _sampler_chain(self, head: Optional[int], t0: Optional[float], top_p: float, seed: int, ignore_eos: bool):
        """[head (the SDA or the guard sampler)] + [logit bias forbidding EOG] + [temp(t0)] + top-p + dist(seed).

        The head goes first: it must see every raw logit, to refuse a NaN/+inf row before anything samples it."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if head is not None:
            llama_cpp.llama_sampler_chain_add(chain, ctypes.cast(head, llama_cpp.llama_sampler_p_ctypes))
        if ignore_eos:
            eog = self.model.eog_tokens()
            biases = (llama_cpp.llama_logit_bias * len(eog))(*[(t, -math.inf) for t in eog])
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_logit_bias(self.model.n_vocab, len(eog), biases)
            )
        if t0 is not None:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(t0))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _sample_numpy(self, chain, strength, k, t0, temperature_mode, acc, step=0, injection=None) -> int:
        """Fallback when libsda is not loaded: fuse in numpy, then the same llama.cpp top-p and dist.
        ``step``: this sampling step (1-based), for the error message; ``injection``: TEST ONLY."""
        n = self.model.n_vocab
        if self._candidates is None:
            self._candidates = np.zeros(n, dtype=_TOKEN_DATA)
            self._token_ids = np.arange(n, dtype=np.int32)
        ctx_w, idx_w = self.streams.with_logits
        ctx_wo, idx_wo = self.streams.without_logits
        z_with = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx_w, idx_w), shape=(n,))
        z_without = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx_wo, idx_wo), shape=(n,))
        if injection is not None and injection.step == step:  # TEST ONLY; a copy: llama.cpp's rows stay intact
            if injection.row == "with":
                z_with = z_with.copy()
                z_with[0] = float(injection.value)
            else:
                z_without = z_without.copy()
                z_without[0] = float(injection.value)
        started = time.perf_counter()
        try:
            fused, temperature, js = fuse_numpy(z_with, z_without, strength, k=k, t0=t0,
                                                temperature_mode=temperature_mode)
        except NonFiniteLogitsError as exc:
            raise generation_stopped(exc.value, exc.row, step) from None
        acc[0] += js
        acc[1] += temperature
        acc[2] += time.perf_counter() - started
        cand = self._candidates
        cand["id"] = self._token_ids  # top-p reorders the array in place
        cand["logit"] = fused
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=n, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
        token = arr.data[arr.selected].id
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _sampled_tokens(self, sample, max_tokens: int, outcome, streams=None) -> Iterator[int]:
        """Sample up to ``max_tokens`` tokens, appending each to the streams; sets ``outcome.finish_reason``
        ("stop": end-of-generation token, "length": max_tokens, "context": the context is full)."""
        streams, model = streams or self.streams, self.model
        for i in range(max_tokens):
            token = sample()
            if model.is_eog(token):
                outcome.finish_reason = "stop"
                return
            yield token
            if i + 1 == max_tokens:
                break
            if streams.room <= 0:
                outcome.finish_reason = "context"
                return
            streams.step(token)
        outcome.finish_reason = "length"

    def complete_with_grammar(self, system: Optional[str], user: str, grammar: str, *, max_tokens: int = 32) -> str:
        """Greedy plain completion of [system, user] constrained by a GBNF grammar (used by the local judge)."""
        model = self.model
        if model is None:
            raise ModelError("the engine is closed")
        if self._aux_streams is None:  # its own context on the same weights, so the streams' caches stay warm
            self._aux_streams = make_streams("contexts", model, n_ctx=self.n_ctx, n_threads=self.n_threads)
        streams = self._aux_streams
        streams.reset()  # a judgement depends on its prompt alone
        tokens = self.tokenize_prompt(self.formatter.render(system, user))
        sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InputError("invalid grammar")
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, sampler)
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        outcome = SimpleNamespace(finish_reason="length")
        # The grammar sampler indexes tokens by id, so the native guard (which hands the chain a -1 candidate)
        # cannot go in front of it: the row is checked in numpy instead (a judgement is a dozen tokens).
        injection = next((i for i in self._injections() if i.seed is None and i.row == "with"), None)
        sample = self._row_checked_sampler(chain, streams, injection)
        try:
            streams.prefill(tokens, None)
            out = list(self._sampled_tokens(sample, max_tokens, outcome, streams))
        finally:
            llama_cpp.llama_sampler_free(chain)
        return b"".join(model.piece(t) for t in out).decode("utf-8", errors="replace")

    def _injections(self):
        if self._logit_injections is None:
            self._logit_injections = logit_injection_from_env()
        return self._logit_injections

    def _row_checked_sampler(self, chain, streams, injection):
        """sample() for a chain without the native guard: refuses a NaN/+inf with-row (one numpy max pass)."""
        n_vocab, step = self.model.n_vocab, [0]

        def sample() -> int:
            step[0] += 1
            ctx, idx = streams.with_logits
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(n_vocab,))
            if injection is not None and injection.step == step[0]:  # TEST ONLY
                row[0] = float(injection.value)  # llama.cpp's host copy, rewritten by the next decode
            value = nonfinite_value(row)
            if value is not None:
                raise generation_stopped(value, None, step[0])
            return llama_cpp.llama_sampler_sample(chain, ctx, idx)

        return sample

    def _run(self, query, alignment: Optional[Alignment], system, strength, max_tokens, t0, top_p,
             temperature_mode, seed, k, ignore_eos, history, keep_cache):
        model, streams = self.model, self.streams
        if model is None:
            raise ModelError("the engine is closed")
        if not keep_cache:
            streams.reset()
        steered = alignment is not None
        if steered:
            prompt_with, prompt_without = self.formatter.pair(query, alignment, history)
        else:
            prompt_with, prompt_without = self.formatter.render(system or QUESTION_SYSTEM, query, history), None
        tokens_with = self.tokenize_prompt(prompt_with)
        tokens_without = self.tokenize_prompt(prompt_without) if steered else None

        injection = next((i for i in self._injections() if i.seed in (None, seed) and (steered or i.row == "with")),
                         None)
        backend = self.fusion_backend if steered else None
        sda_sampler = None
        if backend == "native":
            params = native.make_params(strength, k, t0, TEMPERATURE_MODES[temperature_mode])
            sda_sampler = native.sampler_init(self._native, params, model.n_vocab, None, -1)
        # The native sampler that refuses non-finite rows: the SDA sampler, or in plain generation the guard.
        head = sda_sampler if steered or self._native is None else native.guard_sampler_init(self._native)
        chain = self._sampler_chain(head, None if steered else t0, top_p, seed, ignore_eos)
        fusion_totals = [0.0, 0.0, 0.0]  # sum of JS, sum of T, fusion seconds (numpy path)
        stats = GenerationStats(
            mode="sda" if steered else "plain", streams=streams.mode, fusion_backend=backend,
            strength=strength if steered else None, temperature_mode=temperature_mode if steered else None,
            t0=t0, top_p=top_p, seed=seed, prompt_tokens_with=len(tokens_with),
            prompt_tokens_without=len(tokens_without) if steered else None, shared_prefix_tokens=0,
        )
        tokens: List[int] = []
        pieces: List[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            started = time.perf_counter()
            streams.prefill(tokens_with, tokens_without)
            stats.shared_prefix_tokens = streams.shared_prefix
            if steered:
                stats.prefill_tokens_with, stats.prefill_tokens_without = streams.prefilled
            else:  # plain generation ran in whichever stream it reused
                stats.prefill_tokens_with = sum(streams.prefilled)
            prefilled = time.perf_counter()
            stats.prefill_seconds = prefilled - started
            if injection is not None and head is not None:
                native.inject_fault(self._native, head, INJECTION_VALUES[injection.value], injection.step,
                                    injection.row)
            step = [0]  # sampling steps so far, counted in Python on the numpy paths only

            # A native sampler that met a NaN/+inf row hands back LLAMA_TOKEN_NULL (-1) instead of a token,
            # so the per-token cost of the check here is one integer comparison.
            def refused():
                fault = native.sampler_fault(self._native, head)
                if fault is None:  # not ours: llama.cpp's chain sampled nothing
                    return ModelError("the sampler chain returned no token; generation stopped")
                value, row, at = fault
                return generation_stopped(value, row if steered else None, at)

            if backend == "numpy":
                def sample():
                    step[0] += 1
                    return self._sample_numpy(chain, strength, k, t0, temperature_mode, fusion_totals, step[0],
                                              injection)
            elif sda_sampler is not None:
                def sample():
                    self._native.sda_sampler_set_source(sda_sampler, *streams.without_logits)
                    token = llama_cpp.llama_sampler_sample(chain, *streams.with_logits)
                    if token < 0:
                        raise refused()
                    return token
            elif head is not None:
                def sample():
                    token = llama_cpp.llama_sampler_sample(chain, *streams.with_logits)
                    if token < 0:
                        raise refused()
                    return token
            else:  # plain generation without libsda: the same check in numpy
                sample = self._row_checked_sampler(chain, streams, injection)
            for token in self._sampled_tokens(sample, max_tokens, stats):
                tokens.append(token)
                text = decoder.decode(model.piece(token))
                if text:
                    pieces.append(text)
                    yield text
            tail = decoder.decode(b"", final=True)
            if tail:
                pieces.append(tail)
                yield tail
            stats.decode_seconds = time.perf_counter() - prefilled
            n_steps = len(tokens) + (stats.finish_reason == "stop")
            if sda_sampler is not None:  # the native sampler keeps its own totals
                s = native.sampler_stats(self._native, sda_sampler)
                if s.n_steps != n_steps:
                    raise ModelError("the SDA sampler did not receive the without-instruction logits")
                fusion_totals = [s.sum_js, s.sum_temperature, s.fusion_seconds]
        finally:
            llama_cpp.llama_sampler_free(chain)
        stats.generated_tokens = len(tokens)
        if stats.decode_seconds > 0:
            stats.tokens_per_second = len(tokens) / stats.decode_seconds
        if steered and n_steps:
            stats.mean_js = fusion_totals[0] / n_steps
            stats.mean_temperature = fusion_totals[1] / n_steps
            stats.fusion_us_per_token = fusion_totals[2] / n_steps * 1e6
        return GenerationResult("".join(pieces), tokens, stats, prompt_with, prompt_without)
