"""The full SDA pipeline for one query (SPEC.md section 1).

1. Initial answer without the instruction (T0 0.6, top-p 0.95).
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
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

from .amplifier import DEFAULT_MAP, AMPLIFIER_MAPS, amplifier
from .engine.fusion import DEFAULT_TEMPERATURE_MODE
from .errors import InputError
from .judging import Judgement, JudgeError, make_judge
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


def observes(judge) -> bool:
    """Whether ``judge`` reads its score off an observed first answer (the self judge: its r)."""
    return bool(getattr(judge, "observes", False))


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


def align_stream(engine, query: str, align: str, *, judge="self", **options) -> AlignmentStream:
    """Like ``align`` but yields the SDA answer's text pieces; ``.result`` is an AlignmentResult.

    ``judge``: "self" (the default: the engine's likelihood ratio), "local" (the engine's model scores
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
    temperature_mode: str = DEFAULT_TEMPERATURE_MODE,
    on_close: Optional[Callable[[], None]] = None,
    **generate_options,
) -> AlignmentStream:
    check_text("query", query)
    alignment = resolve_alignment(check_text("alignment", align), generate_options.get("system"))
    if alignment is None:
        raise InputError("align() needs an alignment preset or instruction")
    if amplifier_map not in AMPLIFIER_MAPS:
        raise InputError(f"unknown amplifier map {amplifier_map!r} (choose from {', '.join(AMPLIFIER_MAPS)})")
    parse_failure_policy(on_judge_failure)  # refused now, before any generation
    instruction = alignment.preset or alignment.instruction
    # Validate every option before any generation starts.
    engine.stream(query, instruction, strength=strength or 0.0, temperature_mode=temperature_mode,
                  **generate_options)

    def run():
        follows = None  # the observed first answer's job, whose slot waits for the steered pass
        try:
            stages = {}
            result_fields = dict(instruction=alignment.instruction, amplifier_map=None)
            mode = temperature_mode
            if strength is not None:
                a, source = strength, "strength"
            elif judge is None:
                a, source = DEFAULT_STRENGTH, "default"
            else:
                started = time.perf_counter()
                if observes(judge):  # generated as always, read by the with-instruction stream too: r comes with it
                    # The slot is held from its end to the steered pass, which finds both prompts in its cache.
                    first = engine.stream(query, instruction, observe=True, hold=True, **generate_options)
                    for _ in first:
                        pass
                    initial, follows = first.result, first.job
                else:
                    initial = engine.generate(query, None, **{**generate_options, "system": alignment.system})
                stages["initial"] = time.perf_counter() - started
                result_fields.update(initial_text=initial.text, initial_tokens_per_second=initial.stats.tokens_per_second)
                started = time.perf_counter()
                choice = judge_amplifier(judge, query, initial.text, alignment, amplifier_map=amplifier_map,
                                         on_judge_failure=on_judge_failure, history=generate_options.get("history", ()),
                                         initial_stats=initial.stats)
                stages["judge"] = time.perf_counter() - started
                a, source, mode = choice.amplifier, choice.source, choice.temperature_mode or mode
                result_fields.update(judge=judge.identity, rubric_version=choice.rubric_version, amplifier_map=amplifier_map)
                judgement = choice.judgement
                if judgement is not None:  # no map when the judge set a itself
                    result_fields.update(score=judgement.score, scoring=judgement.scoring, score_spread=judgement.spread,
                                         judge_reply=judgement.raw,
                                         amplifier_map=None if judgement.amplifier is not None else amplifier_map)
                    on_judged(judgement, a)
                else:
                    result_fields["judge_failure"] = choice.failure
                    on_warning(f"judge failed: {choice.failure}; {choice.note}")
            started = time.perf_counter()
            # The SDA pass reuses the cache the initial answer left in the slot: both prompts when it was observed.
            stream = engine.stream(query, instruction, strength=a, temperature_mode=mode, follows=follows,
                                   **generate_options)
            yield from stream
            stages["sda"] = time.perf_counter() - started
            final = stream.result
            return AlignmentResult(final.text, final.tokens, final.stats, amplifier=a, amplifier_source=source,
                                   stage_seconds=stages, **result_fields)
        finally:  # a failure or a closed stream between the two passes frees the held slot at once
            if follows is not None:
                engine.scheduler.release(follows)

    return AlignmentStream(run(), on_close)
