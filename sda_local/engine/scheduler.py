"""The scheduler: every request of an engine shares one KV layout and one decode per step.

A request (GenerationRequest) becomes a Job. Jobs wait in a queue for a free slot (``n_slots``). Each
``step()``:

1. admits queued jobs into free slots: the free slot whose cache shares the longest prefix with the job's
   prompts when that covers at least half of them (a conversation's next turn), else the lowest free slot;
   the shared prefix is kept and only the rest is prefilled;
2. builds the batch: first one row per active stream of every decoding job (its last sampled token), then
   prompt tokens of prefilling jobs, oldest first, up to ``prefill_chunk`` rows, so a long prompt is
   prefilled over several steps while the others keep decoding. A job's two last prompt tokens go into the
   same step, with logits, and the job samples its first token in that step;
3. decodes (one ``llama_decode`` per context of the layout) and samples every job that has rows, each with
   its own sampler chain reading its own rows.

Rows never depend on each other (layout.py), so a job's tokens are the same whatever else runs.

Driving: whoever waits for a job drives the steps (leader/follower), so a CLI call runs its own request and
N threads that each wait for their job share one batched decode. A server starts one background driver
(``start``) and its handlers only wait, or listen (``Job.listener``, called by the driver after each step
that gave the job output, and once when it ends).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Deque, List, Optional, Union

from ..errors import ModelError
from ..models.gguf import GGUFModel
from .layout import N_BATCH, WITH, WITHOUT, KVLayout, common_prefix_length
from .requests import GenerationRequest, GenerationStats, TokenInfo
from .sampling import RequestSampler
from .text import TextAssembler

log = logging.getLogger("sda_local.scheduler")

QUEUED, PREFILL, DECODE, DONE = "queued", "prefill", "decode", "done"
# A held slot whose follow-up has not come by then is freed (the pipeline releases it itself; this is the net
# under a caller that did not). The hold only spans the judging of a first answer (r read off an observed one,
# or a program's check of a prompted one): no work to speak of.
HOLD_SECONDS = 5.0
IDLE_WAIT = 0.05  # seconds a driver waits when only held slots stand between the queue and the decode


def _lanes_for(slot: "Slot", request: GenerationRequest) -> List[tuple]:
    if request.steered:
        return [(WITH, request.tokens_with), (WITHOUT, request.tokens_without)]
    prompt = request.tokens_with
    stream = max((WITH, WITHOUT), key=lambda s: common_prefix_length(slot.cached[s], prompt))
    return [(stream, prompt)]


def _reuse(slot: "Slot", lanes: List[tuple]) -> int:
    return sum(min(common_prefix_length(slot.cached[s], p), len(p) - 1) for s, p in lanes)


class Slot:
    def __init__(self, index: int, layout: KVLayout):
        self.index = index
        self.locations = [layout.location(index, WITH), layout.location(index, WITHOUT)]
        self.cached: List[List[int]] = [[], []]  # tokens in each stream's cache, position by position
        self.job: Optional["Job"] = None
        self.held_by: Optional["Job"] = None  # a finished job whose follow-up this slot waits for
        self.held_since = 0.0

    @property
    def free(self) -> bool:
        return self.job is None and self.held_by is None


class Job:
    """One request in the scheduler. Read ``pieces`` (text as it comes), ``state``, ``tokens``, ``stats``,
    ``error`` (set when it failed), ``text`` (the whole answer once done)."""

    def __init__(self, request: GenerationRequest, sampler: RequestSampler, stats: GenerationStats):
        self.request, self.sampler, self.stats = request, sampler, stats
        self.state = QUEUED
        self.slot: Optional[Slot] = None
        self.tokens: List[int] = []
        # The answer as it comes: text pieces, or, when the request asks for logprobs or token_stats, one
        # TokenInfo per token carrying its text (one deque, so a reader never sees text without its token).
        self.pieces: Deque[Union[str, TokenInfo]] = collections.deque()
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.listener: Optional[Callable[["Job"], None]] = None
        self._assembler = TextAssembler(request.stop)
        # (stream of the slot, prompt) per decoded stream; a plain job takes the slot's stream whose cache
        # shares more with its prompt (the pipeline's initial answer leaves the SDA pass's without-prompt).
        self._lanes: List[tuple] = []
        self._next = [0, 0]  # prefill: next prompt position to decode, per stream
        self._pending: Optional[int] = None  # decode: the sampled token both streams take next
        self._rows: List[Optional[tuple]] = [None, None]  # this step's output rows, per stream
        self._added: List[List[int]] = [[], []]  # tokens this step's batch appends, per stream
        self._submitted = time.perf_counter()
        self._admitted = 0.0
        self._first_token = 0.0

    @property
    def done(self) -> bool:
        return self.state == DONE

    @property
    def text(self) -> str:
        return self._assembler.text

    @property
    def first_logits(self):
        return self.sampler.first_logits


class Scheduler:
    def __init__(self, model: GGUFModel, layout: KVLayout, *, prefill_chunk: int = N_BATCH,
                 compute_lock: Optional[threading.Lock] = None):
        self.model, self.layout = model, layout
        self.compute_lock = compute_lock or threading.Lock()
        self.slots = [Slot(i, layout) for i in range(layout.n_slots)]
        self.prefill_chunk = prefill_chunk
        self._queue: Deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._driving = False
        self._driver: Optional[threading.Thread] = None
        self._stopping = False
        # (seconds of the whole step, seconds inside llama_decode, rows), for the last steps: the bench
        # compares the scheduler's own work per step with the decode.
        self.timings: Deque[tuple] = collections.deque(maxlen=100_000)
        self.closed = False

    # -- submitting and waiting -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if self.closed or self._stopping:
                raise ModelError("the engine is closed")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job: at once between steps, else at the start of the next step (its slot is then free).
        Its listener hears of the end either way."""
        with self._cond:
            job.cancelled = True
            ended = False
            if job.state == QUEUED and job in self._queue:
                self._queue.remove(job)
                self._end(job, "cancelled")
                ended = True
            elif job.state != DONE and not self._driving:  # between steps: the caches are consistent
                self._end(job, "cancelled")
                ended = True
            self._cond.notify_all()
        if ended:
            self._tell([job])

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        """Slots generating, or held for a follow-up."""
        return sum(not s.free for s in self.slots)

    def wait(self, job: Job, *, for_output: bool = False) -> None:
        """Until the job is done (or, with ``for_output``, has unread pieces), driving steps when nobody
        else does."""
        def ready():
            return job.state == DONE or (for_output and bool(job.pieces))

        while True:
            ended_here = False
            with self._cond:
                while not ready():
                    if self.closed:  # closed under it (another thread closed the engine)
                        job.error = job.error or ModelError("the engine is closed")
                        self._end(job, "error")
                        ended_here = True
                        break
                    if not self._driving and self._driver is None:
                        self._driving = True
                        break
                    self._cond.wait()
                else:
                    return
            if ended_here:
                self._tell([job])
                return
            ran = False
            try:
                ran = self.step()
            finally:
                with self._cond:
                    if not ran and not ready() and not self.closed:
                        # Only held slots stand in the way: wait, still the driver (so other waiters do not take
                        # turns at stepping for nothing), until a follow-up or a release notifies.
                        self._cond.wait(IDLE_WAIT)
                    self._driving = False
                    self._cond.notify_all()

    def release(self, job: Job) -> None:
        """Free the slot ``job`` holds for a follow-up (nothing when its follow-up has taken it, or it holds none)."""
        with self._cond:
            for slot in self.slots:
                if slot.held_by is job:
                    slot.held_by = None
            self._cond.notify_all()

    def pieces(self, job: Job):
        """The job's text pieces as they come (a TokenInfo's text, when the request asked for them); raises its
        error, if it failed, once they are read."""
        while True:
            self.wait(job, for_output=True)
            while job.pieces:
                piece = job.pieces.popleft()
                yield piece if isinstance(piece, str) else piece.text
            if job.state == DONE:
                if job.error is not None:
                    raise job.error
                return

    # -- background driver (a server) ---------------------------------------------------------------
    def start(self) -> None:
        """Drive steps in a background thread from now on; waiters only wait."""
        with self._cond:
            if self._driver is None:
                self._driver = threading.Thread(target=self._drive_forever, name="sda-scheduler", daemon=True)
                self._driver.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the background driver (within ``timeout`` seconds). Every job's
        listener hears of its end: the queued ones here, the running ones from the driver's next step (or
        here, when no step is running)."""
        with self._cond:
            self._stopping = True
            ended = list(self._queue)
            for job in ended:
                job.cancelled = True
                self._end(job, "cancelled")
            self._queue.clear()
            for slot in self.slots:
                if slot.job is not None:
                    slot.job.cancelled = True
                    if not self._driving:  # between steps: end it now (no step will)
                        ended.append(slot.job)
                        self._end(slot.job, "cancelled")
            self._cond.notify_all()
        self._tell(ended)
        driver = self._driver
        if driver is not None:
            driver.join(timeout)

    def _has_work(self) -> bool:
        return bool(self._queue) or any(s.job is not None for s in self.slots)

    def _drive_forever(self) -> None:
        while True:
            with self._cond:
                while (not self._has_work() or self._driving) and not (self._stopping and not self._has_work()):
                    self._cond.wait()
                if self._stopping and not self._has_work():
                    return
                self._driving = True
            ran = True
            try:
                ran = self.step()
            except Exception:  # step() has failed its jobs already; the driver lives on for the others
                log.exception("scheduler step failed")
            finally:
                with self._cond:
                    if not ran and not self._stopping:  # queued work behind held slots only: wait for a
                        self._cond.wait(IDLE_WAIT)      # follow-up or a release, still the driver
                    self._driving = False
                    self._cond.notify_all()

    # -- one step -----------------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do. Call it only as the driver."""
        started = time.perf_counter()
        with self._cond:
            self._admit()
            jobs = [s.job for s in self.slots if s.job is not None]
            cancelled = [job for job in jobs if job.cancelled]
            for job in cancelled:  # by cancel() or stop() during the last step
                self._end(job, "cancelled")
            jobs = [j for j in jobs if j.state != DONE]
        self._tell(cancelled)
        if not jobs:
            return False
        layout = self.layout
        for batch in layout.batches:
            batch.clear()
        before = [(job, stream, len(job.slot.cached[stream])) for job in jobs for stream, _ in job._lanes]
        decode_seconds = 0.0
        try:
            sampling = self._plan(jobs)
            with self.compute_lock:
                t0 = time.perf_counter()
                # The with-stream context last: its row is what sampling reads most (llama.cpp's candidates,
                # the fusion), so it should still be in cache, not flushed by the other decode's weights.
                for ctx_index in reversed(range(len(layout.contexts))):
                    layout.decode(ctx_index)
                decode_seconds = time.perf_counter() - t0
            for job in jobs:
                for stream, _ in job._lanes:
                    job.slot.cached[stream].extend(job._added[stream])
            for job in sampling:
                self._sample(job)
        except ModelError as exc:  # the decode failed: every job of this step fails, the others are intact
            self._roll_back(before, exc)
        except Exception as exc:  # a defect: the step's jobs fail with one line, the traceback is logged
            log.exception("scheduler step failed")
            self._roll_back(before, ModelError(f"internal error in the scheduler: {type(exc).__name__}: "
                                               f"{' '.join(str(exc).split())[:200]}"))
        except BaseException as exc:  # KeyboardInterrupt: leave every cache as it was before the step
            self._roll_back(before, exc)
            raise
        finally:
            self._publish(jobs)
        rows = sum(b.n_tokens for b in layout.batches)
        self.timings.append((time.perf_counter() - started, decode_seconds, rows))
        return True

    def _admit(self) -> None:
        for job in [j for j in self._queue if j.request.follows is not None]:  # follow-ups go to their held slot
            slot = next((s for s in self.slots if s.held_by is not None and s.held_by is job.request.follows), None)
            if slot is not None:
                self._queue.remove(job)
                slot.held_by = None
                self._place(job, slot, _lanes_for(slot, job.request))
        now = time.perf_counter()
        for slot in self.slots:  # then holds whose follow-up has not come lapse
            if slot.held_by is not None and now - slot.held_since > HOLD_SECONDS:
                slot.held_by = None
        while self._queue:
            free = [s for s in self.slots if s.free]
            if not free:
                return
            job = self._queue.popleft()
            options = [(slot, lanes, _reuse(slot, lanes)) for slot in free
                       for lanes in [_lanes_for(slot, job.request)]]
            slot, lanes, reused = max(options, key=lambda o: o[2])  # max keeps the lowest slot among equals
            if 2 * reused < sum(len(p) for p in job.request.prompts):
                slot, lanes, _ = options[0]
            self._place(job, slot, lanes)

    def _place(self, job: Job, slot: Slot, lanes: List[tuple]) -> None:
        """Admit ``job`` into ``slot``: the cached prefix of each lane is kept, the rest of the cache dropped."""
        slot.job, job.slot, job.state, job._lanes = job, slot, PREFILL, lanes
        job._admitted = time.perf_counter()
        job.stats.queued_seconds = job._admitted - job._submitted
        kept = []
        for stream, prompt in lanes:
            keep = min(common_prefix_length(slot.cached[stream], prompt), len(prompt) - 1)
            if len(slot.cached[stream]) > keep:
                self.layout.forget(slot.locations[stream], keep)
                del slot.cached[stream][keep:]
            job._next[stream] = keep
            kept.append(keep)
        job.stats.cached_tokens = sum(kept)
        job.stats.prefill_tokens_with = len(lanes[0][1]) - kept[0]
        if job.request.steered:
            job.stats.prefill_tokens_without = len(lanes[1][1]) - kept[1]

    def _plan(self, jobs: List[Job]) -> List[Job]:
        """Fill the batches; returns the jobs that sample in this step."""
        layout, sampling = self.layout, []
        for job in jobs:
            job._rows = [None, None]
            job._added = [[], []]
        for job in jobs:  # decoding jobs first: one row per stream
            if job.state == DECODE:
                for stream, _ in job._lanes:
                    job._rows[stream] = self._add(job, stream, [job._pending], logits_last=True)
                sampling.append(job)
        budget = min(self.prefill_chunk, min(b.room for b in layout.batches))
        for job in jobs:
            if job.state != PREFILL or budget <= 0:
                continue
            remaining = [len(prompt) - job._next[stream] for stream, prompt in job._lanes]
            if sum(remaining) <= budget:  # the whole rest, the last tokens with logits: it samples now
                for stream, prompt in job._lanes:
                    job._rows[stream] = self._add(job, stream, prompt[job._next[stream]:], logits_last=True)
                    job._next[stream] = len(prompt)
                budget -= sum(remaining)
                sampling.append(job)
            else:  # a chunk, never a last token (both last tokens must be decoded in the same step)
                for (stream, prompt), left in zip(job._lanes, remaining):
                    n = min(left - 1, budget)
                    if n > 0:
                        self._add(job, stream, prompt[job._next[stream]:job._next[stream] + n], logits_last=False)
                        job._next[stream] += n
                        budget -= n
        return sampling

    def _add(self, job: Job, stream: int, tokens: List[int], *, logits_last: bool):
        ctx_index, seq = job.slot.locations[stream]
        batch = self.layout.batches[ctx_index]
        start = len(job.slot.cached[stream]) + len(job._added[stream])
        out = -1
        for i, token in enumerate(tokens):
            out = batch.add(token, start + i, seq, logits_last and i == len(tokens) - 1)
        job._added[stream].extend(tokens)
        return self.layout.contexts[ctx_index].ptr, out

    def _sample(self, job: Job) -> None:
        if job.state == PREFILL:
            job.state = DECODE
            job._first_token = time.perf_counter()
            job.stats.prefill_seconds = job._first_token - job._admitted
        try:
            rows = [job._rows[stream] for stream, _ in job._lanes]
            token = job.sampler.sample(rows[0], rows[1] if len(rows) > 1 else None)
        except ModelError as exc:
            job.error = exc
            self._end(job, "error")
            return
        if self.model.is_eog(token):
            self._end(job, "stop")
            return
        job.tokens.append(token)
        piece = job._assembler.feed(self.model.piece(token))
        info, job.sampler.last = job.sampler.last, None
        if info is not None:
            info.text = piece
            job.pieces.append(info)
        elif piece:
            job.pieces.append(piece)
        if job._assembler.stopped:
            self._end(job, "stop")
        elif len(job.tokens) >= job.request.max_tokens:
            self._end(job, "length")
        elif self.layout.n_ctx - max(len(job.slot.cached[s]) for s, _ in job._lanes) <= 0:
            self._end(job, "context")
        else:
            job._pending = token

    def _roll_back(self, before: List[tuple], exc: BaseException) -> None:
        """After a failed or interrupted step: every stream back to the length it had before the step
        (``before``: (job, stream, length)), and every job of the step ended with the error."""
        for job, stream, length in before:
            slot = job.slot
            self.layout.forget(slot.locations[stream], length)
            del slot.cached[stream][length:]
        for job in {job for job, _, _ in before}:
            if job.state != DONE:
                job.error = exc
                self._end(job, "error")

    def _end(self, job: Job, reason: str) -> None:
        if job.state == DONE:
            return
        now = time.perf_counter()
        tail = job._assembler.finish() if reason != "cancelled" else ""
        if tail:
            job.pieces.append(tail)
        s = job.stats
        s.finish_reason = reason
        s.generated_tokens = len(job.tokens)
        if job._first_token:
            s.decode_seconds = now - job._first_token
            if s.decode_seconds > 0:
                s.tokens_per_second = len(job.tokens) / s.decode_seconds
        n_steps = len(job.tokens) + (reason == "stop" and not job._assembler.stopped)
        if job.error is None and reason in ("stop", "length", "context"):
            try:
                totals = job.sampler.fusion_totals(n_steps)
            except ModelError as exc:
                job.error = exc
                totals = None
            if totals is not None:
                s.mean_js, s.mean_temperature, s.fusion_us_per_token, s.fusion_steps_in_place = totals
            if job.sampler.steps:
                s.sampling_us_per_token = job.sampler.sampling_seconds / job.sampler.steps * 1e6
            if job.request.observe:
                s.observed_log_ratio = job.sampler.observed_log_ratio()
        job.sampler.free()
        if job.slot is not None and job.slot.job is job:
            job.slot.job = None
            if (job.request.hold and job.error is None and reason in ("stop", "length") and not job.cancelled
                    and not self._stopping):
                job.slot.held_by, job.slot.held_since = job, now  # kept, cache and all, for its follow-up
        job.state = DONE

    def _publish(self, jobs: List[Job]) -> None:
        with self._cond:
            self._cond.notify_all()
        self._tell([job for job in jobs if job.pieces or job.state == DONE])

    @staticmethod
    def _tell(jobs: List[Job]) -> None:
        """Call the listeners of ``jobs`` (outside the lock: a listener may hand work to an event loop)."""
        for job in jobs:
            if job.listener is not None:
                try:
                    job.listener(job)
                except Exception:  # one broken listener must not keep the others (or the driver) from going on
                    log.exception("a job's listener failed")

    # -- caches ---------------------------------------------------------------------------------------
    def clear_caches(self) -> None:
        """Empty every slot's cache (nothing may be running)."""
        with self._cond:
            self.layout.clear()
            for slot in self.slots:
                slot.cached = [[], []]
                slot.held_by = None

    def close(self) -> None:
        self.stop()
        with self._cond:
            while self._driving:  # a step in another thread finishes first: it uses the layout
                self._cond.wait()
            self.closed = True
            self._cond.notify_all()
        self.layout.close()
