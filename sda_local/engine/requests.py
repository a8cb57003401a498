"""What a generation asks for (GenerationRequest) and what it gives back (GenerationResult, GenerationStats).

A request is validated and tokenized before it reaches the scheduler: the scheduler only decodes and samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

from .fusion import DEFAULT_K, DEFAULT_T0, DEFAULT_TEMPERATURE_MODE, DEFAULT_TOP_P
from .instruction import InstructionGuard
from .steering import PAPER, Steering


@dataclass
class GenerationRequest:
    """One generation. ``tokens_without`` None is plain generation (one stream, temperature ``t0`` and top-p);
    otherwise SDA with amplifier ``strength``. ``grammar``: a GBNF grammar the answer must follow, applied
    after the fusion (``greedy``: decode it greedily, plain only, as the local judge does). ``stop``: strings
    that end the answer (not included in it). ``capture_logits``: keep copies of the first step's raw rows
    (``Job.first_logits``). ``logprobs`` (None: off): report each sampled token's log-probability in the
    step's distribution (after fusion, temperature and grammar, before top-p's cut), with that many
    alternatives; ``token_stats``: report each SDA token's JS divergence, temperature and the with-stream's own
    first choice. Either makes ``Job.pieces`` hold TokenInfo items (each with its text) instead of strings."""

    tokens_with: List[int]
    tokens_without: Optional[List[int]] = None
    max_tokens: int = 256
    seed: int = 0
    strength: float = 0.5
    k: float = DEFAULT_K
    t0: float = DEFAULT_T0
    top_p: float = DEFAULT_TOP_P
    temperature_mode: str = DEFAULT_TEMPERATURE_MODE
    ignore_eos: bool = False
    grammar: Optional[str] = None
    greedy: bool = False
    stop: Tuple[str, ...] = ()
    logprobs: Optional[int] = None
    token_stats: bool = False
    capture_logits: bool = False
    steering: Steering = PAPER
    # Observed (with ``tokens_without``): plain generation from the without-instruction prompt, at t0, while the
    # with-instruction stream reads the same tokens; each token's log-probability under both raw rows is recorded
    # (GenerationStats.observed_log_ratio: the self judge's r of the answer, with no teacher forcing afterwards).
    observe: bool = False
    # Hold: when the job ends with its answer, its slot stays reserved (with both prompts cached) for the request
    # that ``follows`` it: the pipeline's steered pass after its first answer (Scheduler.release frees it else).
    hold: bool = False
    follows: Optional[object] = field(default=None, repr=False, compare=False)  # a Job that held its slot
    # The instruction in this model's tokens, as the guarded steering reads it (empty: nothing to guard).
    guard: InstructionGuard = field(default_factory=InstructionGuard)
    prompt_with: str = field(default="", repr=False)
    prompt_without: Optional[str] = field(default=None, repr=False)

    @property
    def steered(self) -> bool:
        """Two streams are decoded (SDA, or an observed plain answer)."""
        return self.tokens_without is not None

    @property
    def fused(self) -> bool:
        """The two streams' rows are fused (SDA): steered and not observed."""
        return self.steered and not self.observe

    @property
    def inspected(self) -> bool:
        """Sampled from a distribution built in numpy (grammar after fusion, or logprobs to report)."""
        return (self.grammar is not None and not self.greedy) or self.logprobs is not None

    @property
    def prompts(self) -> List[List[int]]:
        return [self.tokens_with] if self.tokens_without is None else [self.tokens_with, self.tokens_without]


@dataclass
class TokenInfo:
    """One sampled token as the request asked to see it (``logprobs``, ``token_stats``)."""

    token: int
    text: str = ""  # the answer text this step added (whole characters: a partial UTF-8 piece waits)
    logprob: Optional[float] = None  # in the step's distribution (after fusion, temperature, grammar; before top-p)
    top: Tuple[Tuple[int, float], ...] = ()  # the most likely tokens of that distribution, best first
    js: Optional[float] = None  # SDA: the JS divergence between the two streams at this step (nats)
    temperature: Optional[float] = None  # SDA: the temperature used at this step
    prompt_top: Optional[int] = None  # SDA: the token the with-instruction stream alone ranked first


@dataclass
class GenerationStats:
    """What one generation did. ``fusion_backend`` is "native", "numpy" or None (plain generation)."""

    mode: str  # "sda", "plain", or "observed" (plain from the without-instruction prompt, read with it too)
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
    prefill_tokens_with: int = 0  # prompt tokens actually decoded (the rest was already in the slot's cache)
    prefill_tokens_without: Optional[int] = None
    cached_tokens: int = 0  # prompt tokens reused from the slot's cache, over both streams
    generated_tokens: int = 0
    queued_seconds: float = 0.0  # waiting for a free slot
    prefill_seconds: float = 0.0  # from taking a slot to the first sampled token
    decode_seconds: float = 0.0
    tokens_per_second: float = 0.0
    mean_js: Optional[float] = None
    mean_temperature: Optional[float] = None
    fusion_us_per_token: Optional[float] = None  # native fusion (or the numpy one) per sampled token
    fusion_steps_in_place: Optional[int] = None  # native fusion steps that read both rows without a copy
    sampling_us_per_token: Optional[float] = None  # the whole sampling call per token: fusion and the chain
    # "stop" (end-of-generation token or stop string), "length" (max_tokens), "context" (the slot is full),
    # "cancelled" (the caller went away), "error" (the job failed: the error is raised to the caller)
    finish_reason: str = "length"
    steering: Optional[dict] = None  # Steering.to_dict() of an SDA generation
    # Observed: the mean over the answer's tokens (end of generation excluded) of log p_with - log p_without.
    observed_log_ratio: Optional[float] = None


    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]
    stats: GenerationStats
    prompt_with: str = field(repr=False, default="")
    prompt_without: Optional[str] = field(repr=False, default=None)
