"""SDAEngine: loads a GGUF model once and generates with or without SDA steering.

Per query (SPEC.md sections 3-5): the with- and without-instruction prompts are prefilled into a slot's two
streams on the same weights; then, every step, the request's sampler chain [sda, top-p, dist] samples from
the fused distribution and the token is appended to both streams. Every generation goes through the
engine's scheduler (scheduler.py), which decodes the streams of all running requests in one
``llama_decode`` per step: a single call is the case of one request, ``parallel`` > 1 lets several threads
(or a server) share the decode.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

from .. import models
from ..models import hardware
from ..errors import ContextOverflowError, InputError, ModelError
from ..models.gguf import SPECIAL_TOKEN_ATTRS, TOKEN_ATTR_LSTRIP, TOKEN_ATTR_RSTRIP, GGUFModel
from ..prompts import QUESTION_SYSTEM, PromptFormatter, check_text, resolve_alignment
from ..seeds import check_seed
from . import native
from .fusion import (DEFAULT_K, DEFAULT_T0, DEFAULT_TEMPERATURE_MODE, DEFAULT_TOP_P, MIN_TOP_P, check_fusion_params,
                     logit_injection_from_env)
from .instruction import InstructionGuard, instruction_guard
from .kvcache import KVConfig, kv_memory
from .layout import STREAM_MODES, KVLayout, batch_policy, common_prefix_length
from .requests import GenerationRequest, GenerationResult, GenerationStats
from .sampling import RequestSampler, check_grammar
from .steering import DEFAULT_STEERING, Steering
from .scheduler import Job, Scheduler

MAX_PARALLEL = 128
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


_ASCII_SPACE = " \t\n\r\f\v"

class GenerationStream:
    """Iterate for text pieces as they are decoded; ``result`` is set once the iteration is complete.
    Nothing runs before the iteration starts; leaving it early cancels the generation."""

    def __init__(self, engine: "SDAEngine", request: GenerationRequest):
        self._engine, self.request = engine, request
        self.job: Optional[Job] = None
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> Iterator[str]:
        engine, request = self._engine, self.request
        self.job = job = engine.submit(request)
        scheduler = engine.scheduler
        try:
            yield from scheduler.pieces(job)
        finally:
            if not job.done:
                scheduler.cancel(job)
        self.result = GenerationResult(job.text, list(job.tokens), job.stats, request.prompt_with,
                                       request.prompt_without)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        pass
    if sys.platform == "darwin":  # Apple Silicon: the performance cores (ggml's barrier waits for the slowest)
        try:
            out = subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True,
                                 timeout=5).stdout
            return max(1, int(out))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return max(1, os.cpu_count() or 1)


class SDAEngine:
    """One loaded model, a scheduler over ``parallel`` slots of two decoding streams each, SDA generation.

    ``model``: None (the default catalogue model, fetched on first use), a catalogue name, or a GGUF path.
    ``streams``: "batched" (one context; every stream a sequence of one decode per step) or "contexts" (two
    contexts on the same weights). ``n_ctx`` is the context of each stream (capped at the model's training
    context, with a note in ``notices``). ``parallel``: requests decoded together (slots); more wait in
    the queue. ``fusion_backend``: "auto" (native when libsda loads), "native" or "numpy". Fusion runs on
    host logits, so CPU, CUDA and Metal builds of llama-cpp-python all work; ``n_gpu_layers`` offloads
    layers as in llama.cpp. ``repack``: "auto" (llama.cpp's weight repacking, except on Intel AMX CPUs
    where its AMX kernels crash), "on" or "off"; None reads $SDA_LOCAL_REPACK, else "auto".
    ``cache_type_k``/``cache_type_v``: the KV cache's element types, "f16", "q8_0" or "q4_0" (a quantized V
    needs flash attention); ``flash_attn``: "auto", "on" or "off", as llama.cpp's. ``kv_memory`` says what
    the caches take (engine/kvcache.py). ``exact``: "on" cuts prompts into small ubatches so that every row's
    logits are those of decoding it alone, whatever the batch (bit-exact on CPU: a = 0 is exactly prompting,
    cache reuse and concurrent requests change nothing); "off" uses llama.cpp's usual ubatch (faster prefill);
    "auto" (None reads $SDA_LOCAL_EXACT, else auto) is on unless layers are offloaded to a GPU.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        n_ctx: int = 4096,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        streams: str = "batched",
        parallel: int = 1,
        verbose: bool = False,
        fusion_backend: str = "auto",
        repack: Optional[str] = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        flash_attn: str = "auto",
        exact: Optional[str] = None,
    ):
        if streams not in STREAM_MODES:
            raise InputError(f"unknown streams mode {streams!r} (choose from {', '.join(STREAM_MODES)})")
        if not isinstance(n_ctx, int) or n_ctx < 16:
            raise InputError(f"n_ctx must be an integer >= 16, got {n_ctx!r}")
        if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= MAX_PARALLEL:
            raise InputError(f"parallel must be an integer in [1, {MAX_PARALLEL}], got {parallel!r}")
        if fusion_backend not in ("auto", "native", "numpy"):
            raise InputError(f"unknown fusion backend {fusion_backend!r} (choose from auto, native, numpy)")
        repack = hardware.check_repack(repack)
        self.kv = KVConfig(cache_type_k, cache_type_v, flash_attn).check()
        self.n_gpu_layers = n_gpu_layers
        self.batching = batch_policy(exact, n_gpu_layers)
        self.model_path = models.resolve(model)
        self.model = GGUFModel(self.model_path, n_gpu_layers=n_gpu_layers, verbose=verbose, repack=repack)
        self.repack = repack
        self.notices: List[str] = []  # one-line notes for the user (the CLI prints them)
        if 0 < self.model.n_ctx_train < n_ctx:
            self.notices.append(f"n_ctx {n_ctx} is beyond the model's training context; "
                                f"capped at {self.model.n_ctx_train}")
            n_ctx = self.model.n_ctx_train
        self.n_ctx = n_ctx
        self.parallel = parallel
        self.n_threads = n_threads or _default_threads()
        self.streams_mode = streams
        self.formatter = PromptFormatter(self.model.chat_template, self.model.bos_token, self.model.eos_token)
        self._native = native.library()  # also the guard and nucleus samplers, whatever fuses
        self._numpy_fusion = fusion_backend == "numpy" or self._native is None
        # instruction_guard's results (a few dozen tokenizations each; a server sees the same presets again and again)
        self._guards: dict = {}
        if fusion_backend == "native" and self._native is None:
            raise InputError(f"the native fusion library is not loaded: {native.load_error()}")
        # One computation at a time on these weights: the scheduler's decodes and the judges' teacher
        # forcing come from different threads, and two llama.cpp thread pools on the same cores spin
        # against each other.
        self.compute_lock = threading.Lock()
        self.kv_memory = kv_memory(self.model.attention_shape(), self.kv, n_ctx=n_ctx, slots=parallel)
        layout = KVLayout(streams, self.model, n_slots=parallel, n_ctx=n_ctx, n_threads=self.n_threads, kv=self.kv,
                          batching=self.batching)
        self.scheduler = Scheduler(self.model, layout, compute_lock=self.compute_lock)
        self._forcing = None  # for the judges that read distributions (expected, self), created on first use
        self._forcing_guard = threading.Lock()
        self._closing = False  # set by close(), under _forcing_guard
        self._logit_injections = None  # TEST ONLY (see fusion.logit_injection_from_env), read on first use


    def describe_memory(self) -> str:
        """One line for the user at load: the KV caches and how prompts are batched."""
        return f"{self.kv_memory.describe()}; {self.batching.describe()}"

    @property
    def fusion_backend(self) -> str:
        return "numpy" if self._numpy_fusion else "native"

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
        temperature_mode: str = DEFAULT_TEMPERATURE_MODE,
        seed: Optional[int] = None,
        system: Optional[str] = None,
        k: float = DEFAULT_K,
        ignore_eos: bool = False,
        stop: Sequence[str] = (),
        history: Sequence[Tuple[str, str]] = (),
        steering: Optional[Steering] = None,
        observe: bool = False,
        hold: bool = False,
        follows: Optional[Job] = None,
    ) -> GenerationStream:
        """Generate, yielding text pieces as they are decoded.

        ``instruction``: a preset name (helpfulness, harmlessness, honesty, empathy, summarization), any
        instruction text, or None for plain generation (one stream at temperature ``t0`` with top-p).
        ``strength`` is the amplifier a of SPEC.md (0 = prompting with the instruction). ``steering``: how the
        streams are contrasted (steering.Steering; None: DEFAULT_STEERING, steering.PAPER: the paper's formula
        exactly). ``history``: earlier
        (user, assistant) turns of a conversation. ``stop``: strings that end the answer. ``observe`` (with an
        instruction): the answer is plain generation without the instruction (at ``t0``, as with no instruction
        and the instruction's system prompt), while the with-instruction stream reads it: the result's
        ``stats.observed_log_ratio`` is the self judge's r of it, and the slot keeps both prompts cached for an
        SDA pass that follows (the pipeline's first answer). ``hold``: the slot stays
        reserved when the answer ends, for a request that ``follows`` this one's job (``GenerationStream.job``;
        ``engine.scheduler.release(job)`` frees it if none comes). A slot's cache
        keeps what earlier calls left, and a prompt that extends it prefills only its new tokens; the
        result is the same as from an empty cache (layout.py), so it depends on the arguments alone.
        """
        if self.model is None:
            raise ModelError("the engine is closed")
        check_text("query", query)
        alignment = resolve_alignment(check_text("instruction", instruction), system) if instruction is not None else None
        if system is not None:
            check_text("system prompt", system)
        history = [(check_text("history user turn", u), str(a)) for u, a in history]
        if alignment is not None:
            prompt_with, prompt_without = self.formatter.pair(query, alignment, history)
        else:
            prompt_with, prompt_without = self.formatter.render(system or QUESTION_SYSTEM, query, history), None
        return GenerationStream(self, self.request(
            prompt_with, prompt_without, strength=strength, max_tokens=max_tokens, t0=t0, top_p=top_p,
            temperature_mode=temperature_mode, seed=seed, k=k, ignore_eos=ignore_eos, stop=stop,
            steering=steering, instruction=alignment.instruction if alignment is not None else None, observe=observe,
            hold=hold, follows=follows))

    def request(self, prompt_with: str, prompt_without: Optional[str] = None, *, strength: float = 0.5,
                max_tokens: int = 256, t0: float = DEFAULT_T0, top_p: float = DEFAULT_TOP_P,
                temperature_mode: str = DEFAULT_TEMPERATURE_MODE, seed: Optional[int] = None, k: float = DEFAULT_K,
                ignore_eos: bool = False, stop: Sequence[str] = (), grammar: Optional[str] = None,
                greedy: bool = False, capture_logits: bool = False, steering: Optional[Steering] = None,
                instruction: Optional[str] = None, logprobs: Optional[int] = None,
                token_stats: bool = False, observe: bool = False, hold: bool = False,
                follows: Optional[Job] = None) -> GenerationRequest:
        """A validated, tokenized request from rendered prompts (``prompt_without`` None: plain).
        ``steering``: how the streams are contrasted (steering.py); its echo guard needs the ``instruction``
        text. ``grammar``, ``greedy``, ``logprobs``, ``token_stats``, ``observe``, ``hold``, ``follows``: GenerationRequest's."""
        if self.model is None:
            raise ModelError("the engine is closed")
        check_fusion_params(strength, k, t0, temperature_mode)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and MIN_TOP_P <= top_p <= 1.0):
            raise InputError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {top_p!r}")
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) for s in stop):
            raise InputError("stop must be a string or a list of strings")
        if greedy and (grammar is None or prompt_without is not None):
            raise InputError("greedy decoding is for a grammar-constrained plain completion")
        if follows is not None and not isinstance(follows, Job):
            raise InputError("follows must be the Job of an earlier request (GenerationStream.job)")
        if observe and (prompt_without is None or grammar is not None or logprobs is not None):
            raise InputError("an observed answer needs an instruction, and takes no grammar nor logprobs")
        if grammar is not None:
            check_grammar(self.model, grammar)  # here, so that a server answers 400, not a failed stream
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")
        seed = secrets.randbelow(2**31) if seed is None else check_seed(seed)
        steering = DEFAULT_STEERING if steering is None else steering
        if not isinstance(steering, Steering):
            raise InputError(f"steering must be a Steering, got {steering!r}")
        steering.check()
        guard = InstructionGuard()
        if steering.reads_instruction and instruction and prompt_without is not None and not observe:
            guard = self.instruction_guard(instruction, steering)
        return GenerationRequest(
            tokens_with=self.tokenize_prompt(prompt_with),
            tokens_without=self.tokenize_prompt(prompt_without) if prompt_without is not None else None,
            max_tokens=max_tokens, seed=seed, strength=float(strength), k=float(k), t0=float(t0),
            top_p=float(top_p), temperature_mode=temperature_mode, ignore_eos=ignore_eos, grammar=grammar,
            greedy=greedy, logprobs=logprobs, token_stats=bool(token_stats),
            stop=tuple(stop), capture_logits=capture_logits, steering=steering, guard=guard, observe=bool(observe),
            hold=bool(hold), follows=follows,
            prompt_with=prompt_with, prompt_without=prompt_without)

    def instruction_guard(self, instruction: str, steering: Steering) -> InstructionGuard:
        """The instruction as ``steering`` reads it, in this model's tokens (instruction.py): its token sequences
        as an answer may copy them (at the start of a line, as the with-prompt has it after the query, and after
        a space), each token's echo-guard run length, and the ids capped or forbidden by its parts."""
        key = (instruction, steering.echo_run, steering.parts, steering.cap)
        guard = self._guards.get(key)
        if guard is None:
            guard = instruction_guard(instruction, lambda text: self.model.tokenize(text, add_bos=False, special=False),
                                      self.model.piece, echo_run=steering.echo_run, read_parts=steering.parts,
                                      cap_directive=steering.cap)
            if len(self._guards) >= 256:  # custom instructions of many clients: keep it bounded
                self._guards.clear()
            self._guards[key] = guard
        return guard

    def submit(self, request: GenerationRequest, *, listener=None) -> Job:
        """Queue a request in the scheduler; follow it with ``scheduler.pieces(job)`` or ``scheduler.wait``,
        or give a ``listener(job)``, which the scheduler calls after each step that gave the job text, and
        once when it ends (from the scheduler's thread: keep it short)."""
        if self.model is None:
            raise ModelError("the engine is closed")
        fused = request.fused
        injection = next((i for i in self._injections()
                          if i.seed in (None, request.seed) and (fused or i.row == "with")), None)
        if request.greedy:  # the judge's completions: only seedless injections reach them
            injection = next((i for i in self._injections() if i.seed is None and i.row == "with"), None)
        sampler = RequestSampler(self.model, self._native, request, injection, numpy_fusion=self._numpy_fusion)
        stats = GenerationStats(
            mode="sda" if fused else "observed" if request.observe else "plain", streams=self.streams_mode,
            fusion_backend=sampler.backend,
            strength=request.strength if fused else None,
            temperature_mode=request.temperature_mode if fused else None, t0=request.t0, top_p=request.top_p,
            steering=request.steering.to_dict() if fused else None,
            seed=request.seed, prompt_tokens_with=len(request.tokens_with),
            prompt_tokens_without=len(request.tokens_without) if request.steered else None,
            shared_prefix_tokens=(common_prefix_length(request.tokens_with, request.tokens_without)
                                  if request.steered else 0),
        )
        job = Job(request, sampler, stats)
        job.listener = listener
        return self.scheduler.submit(job)

    def prompt_lengths(self, query: str, instruction: Optional[str], history: Sequence[Tuple[str, str]] = (), *,
                       system: Optional[str] = None) -> Tuple[int, int]:
        """Prompt tokens of (with-instruction, without-instruction) streams; equal without an instruction."""
        alignment = resolve_alignment(instruction, system) if instruction is not None else None
        if alignment is None:
            n = len(self.prompt_tokens(self.formatter.render(system or QUESTION_SYSTEM, query, history)))
            return n, n
        prompts = self.formatter.pair(query, alignment, history)
        return tuple(len(self.prompt_tokens(p)) for p in prompts)

    def logits(self, query: str, instruction: Optional[str], *, system: Optional[str] = None,
               history: Sequence[Tuple[str, str]] = ()):
        """Raw next-token logits of the first answer token: (with instruction, without instruction), copies."""
        alignment = resolve_alignment(check_text("instruction", instruction), system)
        if alignment is None:
            raise InputError("logits() needs an instruction")
        prompt_with, prompt_without = self.formatter.pair(check_text("query", query), alignment, history)
        job = self.submit(self.request(prompt_with, prompt_without, max_tokens=1, seed=0, capture_logits=True))
        self.scheduler.wait(job)
        if job.error is not None:
            raise job.error
        return job.first_logits

    def forcing(self):
        """The teacher-forcing context on this engine's weights (forcing.ForcingContext), made on first use.
        Use it as a context manager (``with engine.forcing() as forcing:``): one thread at a time."""
        if self.model is None:
            raise ModelError("the engine is closed")
        with self._forcing_guard:
            if self._closing:
                raise ModelError("the engine is closed")
            if self._forcing is None:
                from .forcing import ForcingContext

                self._forcing = ForcingContext(self.model, n_ctx=self.n_ctx, n_threads=self.n_threads, kv=self.kv,
                                               compute_lock=self.compute_lock, batching=self.batching)
                self._forcing.injection = next((i for i in self._injections() if i.seed is None and i.row == "with"),
                                               None)
        return self._forcing

    def reset_caches(self) -> None:
        """Empty every slot's KV cache (results do not depend on it; this frees nothing but the reuse)."""
        self.scheduler.clear_caches()

    def close(self) -> None:
        guard = getattr(self, "_forcing_guard", None)
        if guard is not None:
            with guard:  # no forcing context is made from now on (forcing() sees the engine closing)
                forcing, self._forcing, self._closing = self._forcing, None, True
            if forcing is not None:
                forcing.close()  # waits for a judgement still running on it
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()
            self.scheduler = None
        if getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------------------
    def render(self, system: Optional[str], user: str, history: Sequence[Tuple[str, str]] = ()) -> str:
        return self.formatter.render(system, user, history)

    def prompt_tokens(self, prompt: str) -> List[int]:
        """A prompt's tokens: a rendered ``Prompt`` (prompts.py) has special tokens parsed in the template's text
        only, its messages read as plain text; a plain str is a raw prompt, parsed whole (llama-server's
        /completion does the same). BOS once at the start where the vocabulary asks for one, whether or not the
        template wrote it (llama.cpp adds it and warns of a double one; here a double one is dropped).

        The text between two special tokens of the template is tokenized in one piece, template and message
        text alike, as llama.cpp tokenizes a whole string between the special tokens it finds: a prompt whose
        messages hold no special-token text gets exactly the tokens of the whole string."""
        model = self.model
        tokens: List[int] = []
        run: List[str] = []  # plain text since the last special token
        strip_head = False  # the last special token swallows the whitespace after it (RSTRIP)

        def flush(strip_tail: bool = False) -> None:
            nonlocal strip_head
            text = "".join(run)
            run.clear()
            if strip_head:  # llama.cpp strips ASCII whitespace only (isspace)
                text, strip_head = text.lstrip(_ASCII_SPACE), False
            if strip_tail:
                text = text.rstrip(_ASCII_SPACE)
            if text:
                tokens.extend(model.tokenize(text, add_bos=False, special=False))

        for text, from_template in getattr(prompt, "segments", None) or ((prompt, True),):
            if not from_template:
                run.append(text)
                continue
            at = 0
            for token in model.tokenize(text, add_bos=False, special=True):
                attrs = model.token_attributes(token)
                if not attrs & SPECIAL_TOKEN_ATTRS:
                    continue
                piece = model.token_text(token)
                found = text.find(piece, at) if piece else -1
                if found < 0:  # not placed in the text: it stays plain text of the run
                    continue
                run.append(text[at:found])
                flush(strip_tail=bool(attrs & TOKEN_ATTR_LSTRIP))
                tokens.append(token)
                strip_head = bool(attrs & TOKEN_ATTR_RSTRIP)
                at = found + len(piece)
            run.append(text[at:])
        flush()
        bos = model.bos_id
        if self.model.add_bos and bos >= 0:
            if not tokens or tokens[0] != bos:
                tokens.insert(0, bos)
            while len(tokens) > 1 and tokens[1] == bos:
                del tokens[1]
        return tokens

    def tokenize_prompt(self, prompt: str) -> List[int]:
        """``prompt_tokens``, refusing a prompt that fills the context."""
        tokens = self.prompt_tokens(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx} (raise --n-ctx)"
            )
        return tokens

    def _injections(self):
        if self._logit_injections is None:
            self._logit_injections = logit_injection_from_env()
        return self._logit_injections

