"""The scheduler's failure paths on the real default model: a defect inside a step fails that step's jobs with
one line (and is logged) while the engine goes on; stop() and cancel() wake every listener; closing the
engine while a judgement still decodes on the forcing context waits for it instead of freeing the context
under it."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest

from sda_local import SDAEngine
from sda_local.errors import ModelError


@pytest.fixture
def one_slot(model_path):
    with SDAEngine(str(model_path), n_ctx=512, n_threads=2, parallel=1) as engine:
        yield engine


def fail_plan_once(monkeypatch, scheduler):
    real = scheduler._plan
    calls = {"n": 0}

    def broken(jobs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step: the first job is prefilled and has a token
            raise RuntimeError("planted\ndefect")
        return real(jobs)

    monkeypatch.setattr(scheduler, "_plan", broken)
    return calls


@pytest.mark.parametrize("driven", ["by-waiter", "by-driver"])
def test_a_defect_in_a_step_fails_its_jobs_and_the_engine_goes_on(one_slot, monkeypatch, caplog, driven):
    engine = one_slot
    if driven == "by-driver":
        engine.scheduler.start()  # the server's background driver: a silent failure there left jobs hanging
    calls = fail_plan_once(monkeypatch, engine.scheduler)
    with caplog.at_level(logging.ERROR, logger="sda_local.scheduler"):
        with pytest.raises(ModelError) as failed:
            engine.generate("Name a colour.", "helpfulness", strength=0.5, max_tokens=8, seed=1)
    message = str(failed.value)
    assert message == "internal error in the scheduler: RuntimeError: planted defect"  # one line
    assert calls["n"] >= 2 and any("scheduler step failed" in r.getMessage() for r in caplog.records)
    assert engine.scheduler.busy_slots == 0
    after = engine.generate("Name a colour.", None, max_tokens=4, seed=1)  # the slot and the caches are sound
    assert after.stats.generated_tokens >= 1 and after.stats.finish_reason in ("stop", "length")


def listened(engine, query, max_tokens):
    heard, decoding = threading.Event(), threading.Event()
    ends = []

    def listener(job):
        if job.tokens:
            decoding.set()
        if job.done:
            ends.append(job.stats.finish_reason)
            heard.set()

    job = engine.submit(engine.stream(query, None, max_tokens=max_tokens, seed=1, ignore_eos=True).request,
                        listener=listener)
    return job, heard, ends, decoding


def test_stop_wakes_the_listener_of_every_job(model_path):
    # stop() while the driver decodes (the server's SIGTERM): the running job's listener hears of its end from
    # the next step, the queued one's at once.
    with SDAEngine(str(model_path), n_ctx=512, n_threads=2, parallel=1) as engine:
        running, running_heard, running_ends, decoding = listened(engine, "Tell me a long story.", 400)
        queued, queued_heard, queued_ends, _ = listened(engine, "Name a colour.", 4)  # one slot: it waits
        engine.scheduler.start()
        assert decoding.wait(60)  # the running job has tokens: the driver is mid-generation
        engine.scheduler.stop(timeout=30)
        assert running_heard.wait(30) and queued_heard.wait(30)
        assert queued_ends == ["cancelled"] and running_ends == ["cancelled"]
        assert running.done and queued.done and len(running.tokens) < 400


def test_cancel_wakes_the_listener_of_a_queued_job(one_slot):
    engine = one_slot
    job, heard, ends, _ = listened(engine, "Name a colour.", 4)  # nobody drives: it stays queued
    engine.scheduler.cancel(job)
    assert heard.is_set() and ends == ["cancelled"]


def test_cancel_while_the_driver_decodes_wakes_the_listener(one_slot):
    engine = one_slot
    job, heard, ends, decoding = listened(engine, "Tell me a long story.", 400)
    engine.scheduler.start()
    assert decoding.wait(60)
    engine.scheduler.cancel(job)  # mid-step, most likely: it ends at the start of the next one
    assert heard.wait(30) and ends == ["cancelled"] and len(job.tokens) < 400


_CLOSE_UNDER_A_JUDGE = r"""
import sys, threading
from sda_local import SDAEngine
from sda_local.errors import ModelError

engine = SDAEngine(sys.argv[1], n_ctx=512, n_threads=2)
inside, outcome = threading.Event(), []

def judge():
    # A judgement left running (its client went away): teacher forcing, call after call, on the engine.
    prompt = engine.tokenize_prompt(engine.render(None, "Why is the sky blue?"))
    answer = engine.model.tokenize(" Because of Rayleigh scattering of sunlight." * 4, add_bos=False, special=False)
    forcing = engine.forcing()
    with forcing:
        inside.set()
        try:
            for _ in range(10000):
                forcing.continuation_logprobs([prompt, prompt], answer)
            outcome.append("never stopped")
        except ModelError as exc:
            outcome.append(str(exc))
        outcome.append("context still held: %s" % (forcing.ctx is not None))

thread = threading.Thread(target=judge)
thread.start()
inside.wait()
engine.close()  # must not free the forcing context while the judge decodes on it
thread.join()
print("|".join(outcome))
"""


def test_closing_the_engine_waits_for_a_running_judgement(model_path):
    # In a child process: freeing a context under a decode crashes the process, which must not be pytest's.
    out = subprocess.run([sys.executable, "-c", _CLOSE_UNDER_A_JUDGE, str(model_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "the engine is closing|context still held: True", out.stdout
