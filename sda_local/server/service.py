"""Between HTTP and the engine: a validated request becomes prompts, then jobs in the engine's scheduler.

The scheduler runs in its own thread (``Scheduler.start``); the event loop only submits jobs and awaits
their pieces, which the scheduler thread hands over through ``loop.call_soon_threadsafe``. The judge of
the SDA pipeline (teacher forcing, or a remote call) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Tuple

from ..engine import SDAEngine
from ..engine.fusion import (DEFAULT_T0, DEFAULT_TEMPERATURE_MODE, DEFAULT_TOP_P, MAX_STRENGTH, MIN_T0,
                             TEMPERATURE_MODES)
from ..engine.requests import GenerationRequest, TokenInfo
from ..engine.steering import DEFAULT_STEERING, PAPER, STEERING_MODES
from ..engine.scheduler import Job
from ..errors import InputError
from ..grammars import grammar_for
from ..pipeline import DEFAULT_STRENGTH, AlignedJob, plan_alignment
from ..prompts import PRESETS, Prompt, check_text, resolve_alignment
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, SDAOptions


# The judged first answer's length at most: enough to judge an answer by, and what the judge's prompt holds.
JUDGED_ANSWER_TOKENS = 512


class Overloaded(Exception):
    """Every slot is busy and the queue is full."""


@dataclass
class Conversation:
    system: Optional[str]
    history: List[Tuple[str, str]]
    query: str


@dataclass
class Delta:
    """What one wake of a response adds: answer text (with its tokens' figures, when asked for), or the
    judging's text (the first answer and the judge's verdict), sent as reasoning_content."""

    content: str = ""
    reasoning: str = ""
    tokens: List[TokenInfo] = field(default_factory=list)


@dataclass
class Plan:
    """What one HTTP request will run."""

    request: GenerationRequest  # the answer's: plain, or the steered one (its a is set once the judge has spoken)
    sda: Optional[SDAOptions]
    conversation: Optional[Conversation]
    aligned: Optional[AlignedJob] = None  # SDA: the first answer -> judge -> a -> steered answer flow
    report: dict = field(default_factory=dict)  # the response's "sda" object
    job: Optional[Job] = None  # the answer's, once it started


# What a response's "sda" object says of how a was chosen (AlignedJob.report has more).
REPORTED = ("amplifier", "score", "judge", "rubric_version", "amplifier_source")


def conversation_of(messages) -> Conversation:
    """OpenAI messages -> system prompt, (user, assistant) turns, and the last user message. System (and
    developer) messages are joined; consecutive messages of one role are joined."""
    system_parts, turns = [], []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if role in ("tool", "function") or message.tool_calls:
            raise InputError("tool and function messages are not supported")
        text = message.text()
        if role == "system":
            system_parts.append(text)
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user":
        raise InputError("the last message must be a user message")
    if turns[0][0] != "user":
        raise InputError("the first message after the system messages must be a user message")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    query = check_text("the last user message", turns[-1][1])
    for user, _ in history:
        check_text("a user message", user)
    system = "\n\n".join(system_parts) if system_parts else None
    return Conversation(system, history, query)


class GenerationService:
    def __init__(self, engine: SDAEngine, judge, *, model_id: str, queue_size: int, metrics: Metrics):
        self.engine, self.judge, self.model_id = engine, judge, model_id
        self.metrics = metrics
        self.capacity = engine.parallel + queue_size
        self.in_flight = 0

    def capabilities(self) -> dict:
        """The server's SDA choices: its judge, the alignment presets, the temperature modes, the bounds."""
        return {"judge": self.judge.identity if self.judge is not None else None, "presets": sorted(PRESETS),
                "temperature_modes": list(TEMPERATURE_MODES), "default_temperature_mode": DEFAULT_TEMPERATURE_MODE,
                "steering_modes": list(STEERING_MODES),
                "max_strength": MAX_STRENGTH, "default_strength": DEFAULT_STRENGTH, "n_ctx": self.engine.n_ctx,
                "slots": self.engine.parallel}

    # -- admission ------------------------------------------------------------------------------------
    def admit(self) -> None:
        if self.in_flight >= self.capacity:
            raise Overloaded()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    # -- planning -------------------------------------------------------------------------------------
    def plan_chat(self, body: ChatCompletionRequest) -> Plan:
        conv = conversation_of(body.messages)
        engine, f = self.engine, self.engine.formatter
        sda = body.sda
        options = self._options(body, sda)
        if sda is None:
            prompt = f.render(conv.system, conv.query, conv.history)
            return Plan(engine.request(prompt, None, **options), None, conv)
        alignment = resolve_alignment(sda.align, conv.system)
        if alignment is None:
            raise InputError('sda.align is "none": leave the sda object out for plain generation')
        prompt_with, prompt_without = f.pair(conv.query, alignment, conv.history)
        return self._sda_plan(prompt_with, prompt_without, options, sda, conv, alignment)

    def plan_completion(self, body: CompletionRequest) -> Plan:
        engine, sda = self.engine, body.sda
        options = self._options(body, sda)
        prompt = check_text("prompt", body.prompt)
        if sda is None:
            return Plan(engine.request(prompt, None, **options), None, None)
        # A raw prompt has no user turn: the with-stream reads the instruction first (as plain text), then the
        # prompt (raw: the caller's special tokens are read, as llama-server reads them).
        alignment = resolve_alignment(sda.align)
        if alignment is None:
            raise InputError('sda.align is "none": leave the sda object out for plain generation')
        conv = Conversation(None, [], prompt)
        prompt_with = Prompt([(alignment.instruction, False), ("\n\n" + prompt, True)])
        return self._sda_plan(prompt_with, prompt, options, sda, conv, alignment)

    def _options(self, body, sda: Optional[SDAOptions]) -> dict:
        t0 = sda.t0 if sda is not None and sda.t0 is not None else body.temperature
        t0 = DEFAULT_T0 if t0 is None else max(t0, MIN_T0)  # temperature 0: as good as greedy
        # No max_tokens: until EOS or the slot's context is full (the scheduler ends it there first).
        max_tokens = body.token_limit or self.engine.n_ctx
        options = dict(max_tokens=max_tokens, t0=t0, top_p=body.top_p or DEFAULT_TOP_P, seed=body.seed,
                       stop=tuple(body.stop or ()), ignore_eos=body.ignore_eos, grammar=grammar_for(body.response_format),
                       logprobs=body.logprob_count)
        if sda is not None:
            options.update(k=sda.k, temperature_mode=sda.temperature_mode, token_stats=sda.token_stats)
        return options

    def _sda_plan(self, prompt_with, prompt_without, options, sda: SDAOptions, conv, alignment) -> Plan:
        # The first answer follows the same response format; what is reported is the steered answer's. It is
        # only judged: without a max_tokens it stops at JUDGED_ANSWER_TOKENS, not at the context's end.
        judge = self.judge if sda.judge == "server" else None
        steering = DEFAULT_STEERING if sda.steering == DEFAULT_STEERING.mode else PAPER
        aligned = plan_alignment(self.engine, prompt_with, prompt_without, alignment, query=conv.query,
                                 history=conv.history, judge=judge, strength=sda.strength,
                                 amplifier_map=sda.amplifier_map, on_judge_failure=sda.on_judge_failure,
                                 first_max_tokens=JUDGED_ANSWER_TOKENS, steering=steering, **options)
        report = aligned.report()
        return Plan(aligned.steered_request, sda, conv, aligned, {key: report[key] for key in REPORTED})

    # -- running --------------------------------------------------------------------------------------
    async def run(self, plan: Plan) -> AsyncIterator[Delta]:
        """The response's deltas: the judging's (when the request is judged and shows it), then the answer's;
        ``plan.report`` and the job's stats are complete when it ends."""
        aligned = plan.aligned
        try:
            if aligned is not None and aligned.judged:
                judging = self._judge(plan)
                try:
                    async for delta in judging:
                        yield delta
                finally:  # closed now, not by the garbage collector: that cancels the first answer's job
                    await judging.aclose()
            submit = aligned.start_steered if aligned is not None else functools.partial(self.engine.submit,
                                                                                          plan.request)
            plan.job, deltas = self._start(submit)
            try:
                async for delta in deltas:
                    yield delta
            finally:
                await deltas.aclose()  # cancels the job first, if it is still running, then accounts for it
                self._account(plan, plan.job)
        finally:
            if aligned is not None:  # a hold the steered answer did not take is freed (a failure, a client gone)
                aligned.close()

    async def _judge(self, plan: Plan) -> AsyncIterator[Delta]:
        aligned, show = plan.aligned, plan.sda.show_judging
        job, deltas = self._start(aligned.start_first, reasoning=True)
        try:
            async for delta in deltas:
                if show:
                    yield delta
        finally:
            await deltas.aclose()
        # The judge decodes or calls out: off the event loop. "error": the JudgeError, raised.
        choice = await asyncio.get_running_loop().run_in_executor(None, aligned.decide)
        a = choice.amplifier
        report = aligned.report()
        plan.report.update({key: report[key] for key in REPORTED})
        if choice.judgement is not None:
            verdict = f"judge {self.judge.identity}: score {choice.judgement.score:.3g}, a = {a:.3g}"
        else:
            plan.report["judge_failure"] = choice.failure
            verdict = f"judge {self.judge.identity} failed ({choice.failure}): a = {a:.3g}"
        self.metrics.observe_amplifier(a)
        if show:
            yield Delta(reasoning=("\n\n" if job.text else "") + verdict)

    def _start(self, submit, *, reasoning: bool = False):
        """``submit(listener=...)`` queues a request and returns its Job: the Job, and its deltas."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        job = submit(listener=lambda _: loop.call_soon_threadsafe(wake.set))
        return job, self._deltas(job, wake, reasoning)

    async def _deltas(self, job: Job, wake: asyncio.Event, reasoning: bool) -> AsyncIterator[Delta]:
        try:
            while True:
                # The scheduler thread appends while this reads: popleft() on a deque is atomic, and a token's
                # text travels inside its TokenInfo, so the two never come apart.
                texts, infos = [], []
                while job.pieces:
                    piece = job.pieces.popleft()
                    if isinstance(piece, str):
                        texts.append(piece)
                    else:
                        texts.append(piece.text)
                        infos.append(piece)
                if texts or infos:
                    text = "".join(texts)
                    yield Delta(reasoning=text) if reasoning else Delta(content=text, tokens=infos)
                if job.done and not job.pieces:
                    if job.error is not None:
                        raise job.error
                    return
                if not job.done:
                    await wake.wait()
                    wake.clear()
        finally:
            if not job.done:  # the client went away, or the server is stopping
                self.engine.scheduler.cancel(job)
                self.metrics.observe_cancelled()

    def _account(self, plan: Plan, job: Job) -> None:
        s = job.stats
        self.metrics.observe_generation(s)
        if plan.sda is not None:
            plan.report.update(mean_js=s.mean_js, mean_temperature=s.mean_temperature)
            if not plan.aligned.judged:
                self.metrics.observe_amplifier(plan.request.strength)
