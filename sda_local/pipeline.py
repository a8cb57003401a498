"""The full SDA pipeline for one query (SPEC.md section 1).

1. Initial answer without the instruction (T0 0.6, top-p 0.95); for a judge that checks a verifiable
   instruction by program (``verify``, and ``auto`` on such instructions), the answer *with* it, a = 0.
2. A judge scores it 1..100 under the dimension's rubric (a custom instruction is scored against itself).
3. a = F(score) (``amplifier_map``, the paper's sigmoid by default).
4. SDA generation with that a.

``strength`` given: steps 1-3 are skipped. No judge (``judge=None``): a = DEFAULT_STRENGTH. A judge failure
is shown to the user and resolved by ``on_judge_failure``: "error" (raise), "fixed:A" (a = A) or
"prompt-only" (a = 0 at fixed temperature: prompting alone). It can never produce a negative a.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from .amplifier import DEFAULT_MAP, AMPLIFIER_MAPS, amplifier
from .errors import InputError, ModelError
from .judging import DEFAULT_JUDGE, Judgement, JudgeError, make_judge
from .judging.verifier import FIRST_OBSERVED, FIRST_PROMPTED, FIRST_WITHOUT, first_answer_mode, observes
from .prompts import check_text, resolve_alignment
from .rubrics import rubric_for

DEFAULT_STRENGTH = 0.5
DEFAULT_ON_JUDGE_FAILURE = f"fixed:{DEFAULT_STRENGTH}"


def amplifier_of(judgement: Judgement, amplifier_map: str = DEFAULT_MAP) -> float:
    """The amplifier a judgement sets: the judge's own (the self judge maps its likelihood ratio), else
    a = F(score) with ``amplifier_map``."""
    if judgement.amplifier is not None:
        return judgement.amplifier
    return amplifier(judgement.score, amplifier_map)


def parse_failure_policy(policy: str) -> Tuple[str, Optional[float]]:
    """"error" | "prompt-only" | "fixed:A" -> (kind, A)."""
    text = (policy or "").strip().lower()
    if text in ("error", "prompt-only"):
        return text, None
    if text.startswith("fixed:"):
        try:
            value = float(text[len("fixed:"):])
        except ValueError:
            value = float("nan")
        if math.isfinite(value) and value >= 0:
            return "fixed", value
    raise InputError(f"unknown judge-failure policy {policy!r} (error, prompt-only or fixed:A with A >= 0)")


@dataclass
class AmplifierChoice:
    """What a judgement of the first answer sets: a, where it came from, and the temperature mode when a
    judge failure falls back to prompting alone."""

    amplifier: float
    source: str  # "judge" or "judge-failure"
    rubric_version: str
    judgement: Optional[Judgement] = None
    temperature_mode: Optional[str] = None  # "fixed" for the prompt-only fallback, else the request's own
    failure: Optional[str] = None  # the judge's error
    note: Optional[str] = None  # what was done instead, for a warning


def judge_amplifier(judge, query: str, answer: str, alignment, *, amplifier_map: str = DEFAULT_MAP,
                    on_judge_failure: str = DEFAULT_ON_JUDGE_FAILURE, history=(), initial_stats=None
                    ) -> AmplifierChoice:
    """Steps 2-3 of the pipeline, for every path that runs it (``align_stream`` here, the server): the judge
    scores ``answer`` to ``query`` (after the conversation's earlier turns ``history``) under ``alignment``'s
    rubric, and a follows; a JudgeError is resolved by ``on_judge_failure`` (raised for "error").
    ``initial_stats``: the first answer's GenerationStats; when it was observed, a judge that ``observes`` takes
    its r from there instead of teacher-forcing the answer again."""
    rubric = rubric_for(alignment)
    try:
        if observes(judge) and initial_stats is not None and initial_stats.mode == "observed":
            judgement = judge.judgement(initial_stats.observed_log_ratio)
        else:
            judgement = judge.score(query, answer, rubric, history=tuple(history))
    except JudgeError as exc:
        kind, value = parse_failure_policy(on_judge_failure)
        if kind == "error":
            raise
        if kind == "fixed":
            return AmplifierChoice(value, "judge-failure", rubric.version, failure=str(exc), note=f"using a = {value:g}")
        return AmplifierChoice(0.0, "judge-failure", rubric.version, temperature_mode="fixed", failure=str(exc),
                               note="using prompting alone (a = 0, fixed temperature)")
    # The rubric version as judged (expected scoring marks its scale).
    return AmplifierChoice(amplifier_of(judgement, amplifier_map), "judge", judgement.rubric_version, judgement)


def steered_settings(first_mode: Optional[str], amplifier: float, steering, temperature_mode: str):
    """The steered answer's (steering, temperature mode) once a is known, after a first answer of ``first_mode``.

    After a prompted first answer (the verify judge's): a = 0 means it complied, and the steered pass is
    prompting alone at T0, the same tokens again; a > 0 means it missed, and the steered answer has no onset,
    since its first tokens would be those of the answer that missed (same seed, a = 0 during the onset)."""
    if first_mode != FIRST_PROMPTED:
        return steering, temperature_mode
    if amplifier == 0:
        return steering, "fixed"
    if steering.onset:
        steering = replace(steering, onset=0)
    return steering, temperature_mode


@dataclass
class AlignmentResult:
    """The SDA answer (``text``, ``tokens``, ``stats``) and how its amplifier was chosen."""

    text: str
    tokens: List[int]
    stats: object  # GenerationStats of the SDA generation
    instruction: str
    amplifier: float
    amplifier_source: str  # "judge", "strength", "default" (no judge) or "judge-failure"
    amplifier_map: Optional[str] = None
    initial_text: Optional[str] = None
    initial_tokens_per_second: Optional[float] = None  # the one-stream initial answer's decode speed
    score: Optional[float] = None  # 1..100, or the self judge's likelihood ratio r
    scoring: Optional[str] = None  # how the judge scored: greedy, expected or self
    score_spread: Optional[float] = None
    judge: Optional[str] = None
    rubric_version: Optional[str] = None
    judge_reply: Optional[str] = None
    judge_failure: Optional[str] = None
    stage_seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stats"] = self.stats.to_dict()
        d.pop("tokens")
        return d


class AlignedJob:
    """One query's SDA flow behind one handle: the first answer, the judge, a, and the steered answer.

    Every path that runs the flow drives it through the same stages: ``align_stream`` (the CLI, batch, chat,
    the llm plugin) from its own thread, the server from its event loop::

        first = job.start_first(listener)      # the first answer's scheduler Job (None: nothing to judge)
        choice = job.decide()                  # the judge and a (blocking: the server runs it off its loop)
        answer = job.start_steered(listener)   # the steered answer's Job
        job.close()                            # always: cancels what still runs, frees an untaken hold

    A first answer the self judge reads is observed (both prompts decoded, r recorded as it is sampled) and its
    slot is held, so the steered answer finds both prompts in that slot's cache. Made by ``plan_alignment``."""

    def __init__(self, engine, alignment, steered, *, query: str, history=(), judge=None, first=None,
                 amplifier_source: str = "default", amplifier_map: str = DEFAULT_MAP,
                 on_judge_failure: str = DEFAULT_ON_JUDGE_FAILURE, first_mode: Optional[str] = None):
        self.engine, self.alignment, self.query, self.history = engine, alignment, query, tuple(history)
        self.judge, self.amplifier_map, self.on_judge_failure = judge, amplifier_map, on_judge_failure
        self.first_request, self.steered_request = first, steered  # GenerationRequests
        self.first_mode = first_mode  # which first answer the judge reads (judging.verifier's FIRST_*)
        self.first_job = self.steered_job = None
        self.choice: Optional[AmplifierChoice] = None
        self._source = amplifier_source  # "strength" or "default" when nothing is judged
        self.stage_seconds: dict = {}
        self._started = self._steered_started = 0.0

    @property
    def judged(self) -> bool:
        return self.first_request is not None

    def start_first(self, listener=None):
        """Submit the first answer; its Job (None when a is not judged). Follow it with ``scheduler.pieces`` or
        the listener."""
        if self.first_request is None:
            return None
        self._started = time.perf_counter()
        self.first_job = self.engine.submit(self.first_request, listener=listener)
        return self.first_job

    def decide(self) -> AmplifierChoice:
        """The amplifier: the judge's verdict on the finished first answer (its failure resolved by the policy;
        "error" raises the JudgeError), or the strength given. Sets the steered request's a (and temperature
        mode, for the prompt-only fallback) and hands it the held slot."""
        if self.choice is not None:
            return self.choice
        request = self.steered_request
        if self.first_job is None:
            self.choice = AmplifierChoice(request.strength, self._source, rubric_for(self.alignment).version)
            return self.choice
        first = self.first_job
        self.engine.scheduler.wait(first)
        if first.error is not None:
            raise first.error
        if first.stats.finish_reason == "cancelled":  # stop(): nothing whole to judge
            raise ModelError("the first answer was cancelled; nothing was judged")
        judging = time.perf_counter()
        self.stage_seconds["initial"] = judging - self._started
        choice = judge_amplifier(self.judge, self.query, first.text, self.alignment, amplifier_map=self.amplifier_map,
                                 on_judge_failure=self.on_judge_failure, history=self.history,
                                 initial_stats=first.stats)
        self.stage_seconds["judge"] = time.perf_counter() - judging
        request.strength = float(choice.amplifier)
        if choice.temperature_mode is not None:
            request.temperature_mode = choice.temperature_mode
        else:
            request.steering, request.temperature_mode = steered_settings(
                self.first_mode, request.strength, request.steering, request.temperature_mode)
        if self.first_request.hold:  # the steered answer takes the slot the first answer holds
            request.follows = first
        self.choice = choice
        return choice

    def start_steered(self, listener=None):
        """Submit the steered answer (after ``decide``); its Job."""
        self.decide()
        self._steered_started = time.perf_counter()
        self.steered_job = self.engine.submit(self.steered_request, listener=listener)
        return self.steered_job

    def close(self) -> None:
        """Cancel a job still running, and free the slot the first answer holds if the steered answer did not
        take it (a failure, a closed stream, a client gone between the two)."""
        scheduler = self.engine.scheduler
        for job in (self.first_job, self.steered_job):
            if job is not None and not job.done:
                scheduler.cancel(job)
        if self.first_job is not None and self.first_request.hold:
            scheduler.release(self.first_job)

    def report(self) -> dict:
        """How a was chosen, for a response's ``sda`` object and AlignmentResult."""
        choice = self.choice
        fields = dict(amplifier=choice.amplifier if choice else self.steered_request.strength,
                      amplifier_source=choice.source if choice else self._source, amplifier_map=None,
                      score=None, scoring=None, score_spread=None, judge=None, rubric_version=None,
                      judge_reply=None, judge_failure=None)
        if choice is None or self.first_job is None:
            return fields
        fields.update(judge=self.judge.identity, rubric_version=choice.rubric_version, amplifier_map=self.amplifier_map)
        judgement = choice.judgement
        if judgement is not None:  # no map when the judge set a itself
            # The judge that spoke: auto names the verify or the self judge it used.
            fields.update(judge=judgement.judge, score=judgement.score, scoring=judgement.scoring, score_spread=judgement.spread,
                          judge_reply=judgement.raw,
                          amplifier_map=None if judgement.amplifier is not None else self.amplifier_map)
        else:
            fields["judge_failure"] = choice.failure
        return fields

    def result(self) -> "AlignmentResult":
        """The steered answer and how its a was chosen (once the steered job is done)."""
        job = self.steered_job
        if job is None or not job.done:
            raise ModelError("the steered answer has not finished")
        self.stage_seconds["sda"] = time.perf_counter() - self._steered_started
        first = self.first_job
        return AlignmentResult(job.text, list(job.tokens), job.stats, instruction=self.alignment.instruction,
                               initial_text=first.text if first is not None else None,
                               initial_tokens_per_second=first.stats.tokens_per_second if first is not None else None,
                               stage_seconds=dict(self.stage_seconds), **self.report())


# The options a first answer takes from the steered request's: what plain generation has (the response format
# included); the fusion's own (k, temperature mode, steering) and what is reported per token are not its.
# ignore_eos is not: the judged answer ends where the model ends it.
_FIRST_ANSWER_OPTIONS = ("max_tokens", "t0", "top_p", "seed", "stop", "grammar")
# What align_stream passes on to the requests: SDAEngine.stream's generation options.
STREAM_OPTIONS = ("max_tokens", "t0", "top_p", "temperature_mode", "seed", "k", "ignore_eos", "stop", "steering")


def plan_alignment(engine, prompt_with, prompt_without, alignment, *, query: str, history=(), judge=None,
                   strength: Optional[float] = None, amplifier_map: str = DEFAULT_MAP,
                   on_judge_failure: str = DEFAULT_ON_JUDGE_FAILURE, first_max_tokens: Optional[int] = None,
                   **request_options) -> AlignedJob:
    """The AlignedJob of one query: its requests made (validated, tokenized) before anything runs.

    ``prompt_with``/``prompt_without``: the rendered prompts (``query`` and ``history`` are what the judge
    reads); ``strength`` given, or no ``judge``: a is that (DEFAULT_STRENGTH) and nothing is judged.
    ``first_max_tokens``: the judged first answer's cap, when it is to be shorter than the answer (the
    server's, without a max_tokens). ``request_options``: ``SDAEngine.request``'s, for the steered answer; the
    first answer takes those that plain generation has, and its response format."""
    if amplifier_map not in AMPLIFIER_MAPS:
        raise InputError(f"unknown amplifier map {amplifier_map!r} (choose from {', '.join(AMPLIFIER_MAPS)})")
    parse_failure_policy(on_judge_failure)  # refused now, before any generation
    steered = engine.request(prompt_with, prompt_without,
                             strength=strength if strength is not None else DEFAULT_STRENGTH,
                             instruction=alignment.instruction, **request_options)
    first = mode = None
    if strength is None and judge is not None:
        plain = {k: v for k, v in request_options.items() if k in _FIRST_ANSWER_OPTIONS}
        mode = first_answer_mode(judge, alignment)
        # A prompted first answer is checked as the answer it may become: never cut shorter than the answer.
        if first_max_tokens is not None and mode != FIRST_PROMPTED:
            plain["max_tokens"] = min(plain.get("max_tokens", first_max_tokens), first_max_tokens)
        if mode == FIRST_PROMPTED:  # held: the steered answer finds its with-prompt cached in that slot
            first = engine.request(prompt_with, None, hold=True, **plain)
        elif mode == FIRST_OBSERVED and plain.get("grammar") is None:
            first = engine.request(prompt_with, prompt_without, observe=True, hold=True, **plain)
        else:
            first = engine.request(prompt_without, None, **plain)
            mode = FIRST_WITHOUT
    return AlignedJob(engine, alignment, steered, query=query, history=history, judge=judge, first=first,
                      amplifier_source="strength" if strength is not None else "default",
                      amplifier_map=amplifier_map, on_judge_failure=on_judge_failure, first_mode=mode)


class AlignmentStream:
    """Iterate for the SDA answer's text pieces (the initial answer and the judge run first);
    ``result`` is the AlignmentResult once the iteration is complete."""

    def __init__(self, run, on_close: Optional[Callable[[], None]] = None):
        self._run = run
        self._on_close = on_close
        self.result: Optional[AlignmentResult] = None

    def __iter__(self) -> Iterator[str]:
        try:
            self.result = yield from self._run
        finally:
            if self._on_close is not None:
                self._on_close()


def align(engine, query: str, align: str, **options) -> AlignmentResult:
    """The full SDA pipeline (initial answer, judge, amplifier, SDA answer); see ``align_stream``."""
    stream = align_stream(engine, query, align, **options)
    for _ in stream:
        pass
    return stream.result


def align_stream(engine, query: str, align: str, *, judge=DEFAULT_JUDGE, **options) -> AlignmentStream:
    """Like ``align`` but yields the SDA answer's text pieces; ``.result`` is an AlignmentResult.

    ``judge``: "auto" (the default: "verify" for an instruction a program checks, else "self"), "self" (the
    engine's likelihood ratio), "verify" (a program checks the prompted first answer), "local" (the engine's model scores
    under a rubric), "local:PATH|NAME", "openai[:MODEL]", "none"/None, or a judge object (SelfJudge,
    LocalJudge, RemoteJudge). Options: ``strength`` (skips the judge), ``amplifier_map``,
    ``on_judge_failure`` ("error", "fixed:A", "prompt-only"), ``on_warning`` (callable), ``on_judged``
    and every option of ``SDAEngine.stream``.
    """
    if not isinstance(judge, str):
        return _align_stream(engine, query, align, judge=judge, **options)
    judge_obj = make_judge(judge, engine)  # made here, so closed here: when the stream ends
    on_close = judge_obj.close if judge_obj is not None else None
    try:
        return _align_stream(engine, query, align, judge=judge_obj, on_close=on_close, **options)
    except BaseException:
        if on_close is not None:
            on_close()
        raise


def _align_stream(
    engine,
    query: str,
    align: str,
    *,
    judge=None,
    strength: Optional[float] = None,
    amplifier_map: str = DEFAULT_MAP,
    on_judge_failure: str = DEFAULT_ON_JUDGE_FAILURE,
    on_warning: Callable[[str], None] = lambda message: None,
    on_judged: Callable[[Judgement, float], None] = lambda judgement, a: None,
    on_close: Optional[Callable[[], None]] = None,
    system: Optional[str] = None,
    history: Sequence[Tuple[str, str]] = (),
    **request_options,
) -> AlignmentStream:
    if engine.model is None:
        raise ModelError("the engine is closed")
    unknown = sorted(set(request_options) - set(STREAM_OPTIONS))
    if unknown:
        raise TypeError(f"align_stream() got an unexpected keyword argument {unknown[0]!r}")
    check_text("query", query)
    if system is not None:
        check_text("system prompt", system)
    alignment = resolve_alignment(check_text("alignment", align), system)
    if alignment is None:
        raise InputError("align() needs an alignment preset or instruction")
    history = [(check_text("history user turn", u), str(a)) for u, a in history]
    prompt_with, prompt_without = engine.formatter.pair(query, alignment, history)
    # Every option is validated here, before any generation starts.
    job = plan_alignment(engine, prompt_with, prompt_without, alignment, query=query, history=history, judge=judge,
                         strength=strength, amplifier_map=amplifier_map, on_judge_failure=on_judge_failure,
                         **request_options)
    scheduler = engine.scheduler

    def run():
        try:
            first = job.start_first()
            if first is not None:
                for _ in scheduler.pieces(first):
                    pass
            choice = job.decide()
            if job.judged:
                if choice.judgement is not None:
                    on_judged(choice.judgement, choice.amplifier)
                else:
                    on_warning(f"judge failed: {choice.failure}; {choice.note}")
            yield from scheduler.pieces(job.start_steered())
            return job.result()
        finally:  # a failure or a closed stream: nothing keeps running, and a held slot is freed at once
            job.close()

    return AlignmentStream(run(), on_close)
