"""The scheduler on the real default model: concurrent requests in one batched decode give each request
exactly the tokens it gets alone; chunked prefill, the queue, cancellation, the prompt cache, stop strings."""

from __future__ import annotations

import threading

import pytest

from sda_local import SDAEngine
from sda_local.engine.text import TextAssembler

LONG = ("Here is some background about bicycles, their history and their parts, written at length so that the "
        "prompt needs several prefill chunks. " * 6)
REQUESTS = [  # (query, instruction, options)
    ("How do I fix a flat bike tyre?", "helpfulness", dict(strength=0.5, seed=1)),
    ("Name three fruits.", None, dict(seed=2)),
    (LONG + "Which part should I oil first?", "Answer in one short sentence.", dict(strength=1.0, seed=3)),
    ("Is it safe to eat raw cookie dough?", "honesty", dict(strength=0.0, seed=4, temperature_mode="fixed")),
    ("Write a haiku about rain.", None, dict(seed=5, t0=1.0)),
]


@pytest.fixture(scope="module")
def alone(model_path):
    """Each request run by itself, on an engine with one slot."""
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2) as engine:
        return [engine.generate(q, i, max_tokens=24, **o).tokens for q, i, o in REQUESTS]


@pytest.fixture(scope="module")
def parallel_engine(model_path):
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2, parallel=3) as engine:
        yield engine


def submit_all(engine):
    # engine.stream's request: tokenized as generate's, the echo guard's instruction tokens included.
    return [engine.submit(engine.stream(q, i, max_tokens=24, **o).request) for q, i, o in REQUESTS]


def _prompts(engine, query, instruction, system=None):
    stream = engine.stream(query, instruction, system=system)
    return stream.request.prompt_with, stream.request.prompt_without


def test_concurrent_requests_get_exactly_their_tokens_alone(parallel_engine, alone):
    engine = parallel_engine
    engine.scheduler.prefill_chunk = 16  # the long prompt is prefilled over many steps, between decodes
    try:
        jobs = submit_all(engine)  # 5 jobs for 3 slots: two wait in the queue, then take freed slots
        for job in jobs:
            engine.scheduler.wait(job)
    finally:
        engine.scheduler.prefill_chunk = 512
    assert [job.error for job in jobs] == [None] * len(jobs)
    assert [job.tokens for job in jobs] == alone
    assert max(job.stats.queued_seconds for job in jobs) > 0
    steps = list(engine.scheduler.timings)
    assert max(rows for _, _, rows in steps) > 3  # some steps really decoded several requests together


def test_threads_share_the_decode_and_a_late_request_is_exact(parallel_engine, alone):
    engine = parallel_engine
    results = [None] * len(REQUESTS)
    started = threading.Event()

    def run(i):
        q, instruction, options = REQUESTS[i]
        stream = engine.stream(q, instruction, max_tokens=24, **options)
        for n, _ in enumerate(stream):
            if i == 0 and n == 3:
                started.set()
        results[i] = stream.result.tokens

    first = threading.Thread(target=run, args=(0,))
    first.start()
    started.wait(60)  # the others arrive while request 0 is decoding
    others = [threading.Thread(target=run, args=(i,)) for i in range(1, len(REQUESTS))]
    for t in others:
        t.start()
    for t in [first] + others:
        t.join(120)
    assert results == alone


def test_cancel_frees_the_slot_at_the_next_step(model_path):
    with SDAEngine(str(model_path), n_ctx=512, n_threads=2, parallel=1) as engine:
        stream = engine.stream("Tell me a long story about a dragon.", "helpfulness", max_tokens=200, seed=1)
        pieces = iter(stream)
        next(pieces)
        pieces.close()  # the caller went away
        job = stream.job
        assert job.done and job.stats.finish_reason == "cancelled" and engine.scheduler.busy_slots == 0
        after = engine.generate("Name a colour.", None, max_tokens=4, seed=1)
        assert after.stats.generated_tokens >= 1


def test_prompt_cache_reuse_is_exact(model_path, parallel_engine):
    history = [("How do I fix a flat bike tyre?", "Find the hole, patch it, and pump the tyre up again.")]
    engine = parallel_engine
    engine.generate("How do I fix a flat bike tyre?", "helpfulness", strength=0.5, seed=1, max_tokens=8)
    reused = engine.generate("And how do I find the hole?", "helpfulness", history=history, strength=0.5, seed=7,
                             max_tokens=24)
    assert reused.stats.cached_tokens > 20  # the system prompt and the first turn came from the slot's cache
    with SDAEngine(str(model_path), n_ctx=1024, n_threads=2) as fresh:
        anew = fresh.generate("And how do I find the hole?", "helpfulness", history=history, strength=0.5, seed=7,
                              max_tokens=24)
    assert anew.stats.cached_tokens == 0 and anew.tokens == reused.tokens


def test_stop_strings_end_the_answer_and_are_not_shown(engine):
    full = engine.generate("Count from 1 to 20, separated by commas.", None, seed=3, max_tokens=48, t0=0.001)
    assert "5" in full.text
    cut = full.text.index("5")
    stopped = engine.generate("Count from 1 to 20, separated by commas.", None, seed=3, max_tokens=48, t0=0.001,
                              stop=["5"])
    assert stopped.text == full.text[:cut] and stopped.stats.finish_reason == "stop"


@pytest.mark.parametrize("pieces,stops,shown,text", [
    (["Hello", " wor", "ld"], ["world"], ["Hello", " "], "Hello "),
    (["a<", "/s", "> b"], ["</s>"], ["a"], "a"),
    (["ab", "c"], ["x"], ["ab", "c"], "abc"),
    (["a", "b"], ["bc"], ["a"], "ab"),  # the held "b" comes out at the end
])
def test_text_assembler_holds_back_possible_stops(pieces, stops, shown, text):
    t = TextAssembler(stops)
    out = [t.feed(p.encode()) for p in pieces]
    out.append(t.finish())
    assert [o for o in out if o][:len(shown)] == shown and t.text == text and "".join(out) == text


def test_text_assembler_joins_split_utf8():
    t = TextAssembler()
    data = "né".encode()
    assert t.feed(data[:2]) == "n" and t.feed(data[2:]) == "é" and t.finish() == "" and t.text == "né"


NO_COMMAS = "Do not use any commas in your answer."


def _held_then_queued(engine, *, hold):
    """An observed first answer (holding its slot or not), then another request queued behind the only slot,
    then the steered pass that follows the first answer: (first, other, follow-up) jobs, all done."""
    engine.reset_caches()
    first = engine.stream("Name three fruits.", NO_COMMAS, observe=True, hold=hold, seed=1, max_tokens=8)
    list(first)
    other = engine.submit(engine.request(engine.render(None, "Describe a cat in detail."), None, seed=2,
                                         max_tokens=4))
    follow = engine.stream("Name three fruits.", NO_COMMAS, strength=0.5, follows=first.job if hold else None,
                           seed=1, max_tokens=8)
    list(follow)
    engine.scheduler.wait(other)
    return first.job, other, follow.job


@pytest.fixture
def long_holds(monkeypatch):
    """Holds that do not lapse while a loaded machine runs the test (the lapse is a safety net, not the subject)."""
    from sda_local.engine import scheduler

    monkeypatch.setattr(scheduler, "HOLD_SECONDS", 600.0)


def test_a_held_slot_waits_for_the_follow_up_that_reuses_its_cache(engine, long_holds):
    assert engine.scheduler.slots and len(engine.scheduler.slots) == 1  # the session engine: one slot
    first, other, follow = _held_then_queued(engine, hold=True)
    s = follow.stats
    # Both prompts were left in the slot by the observed first answer, and the steered pass found them there...
    assert s.cached_tokens == (s.prompt_tokens_with - 1) + (s.prompt_tokens_without - 1)
    # ... though the other request was queued first: it was admitted only once the follow-up had the slot.
    assert other._admitted > follow._admitted
    assert all(slot.held_by is None for slot in engine.scheduler.slots)
    # Without the hold, the queued request takes the slot first and the steered pass prefills again.
    _, other, unheld = _held_then_queued(engine, hold=False)
    assert unheld._admitted > other._admitted
    assert unheld.stats.cached_tokens < s.cached_tokens


def test_release_frees_a_held_slot(engine, long_holds):
    engine.reset_caches()
    first = engine.stream("Name three fruits.", NO_COMMAS, observe=True, hold=True, seed=1, max_tokens=4)
    list(first)
    assert [slot.held_by for slot in engine.scheduler.slots] == [first.job]
    assert engine.scheduler.busy_slots == 1  # held counts as busy
    engine.scheduler.release(first.job)
    assert all(slot.held_by is None for slot in engine.scheduler.slots)
    engine.scheduler.release(first.job)  # twice: nothing
    # A first answer cancelled before it ends holds nothing.
    cancelled = engine.stream("Name three fruits.", NO_COMMAS, observe=True, hold=True, seed=1, max_tokens=4)
    for _ in cancelled:
        break
    assert all(slot.held_by is None for slot in engine.scheduler.slots)
    with pytest.raises(Exception, match="follows must be"):
        engine.request("x", None, follows="not a job")
