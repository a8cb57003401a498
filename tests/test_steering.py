"""Steering beside the paper's formula (engine/steering.py, the native sampler's guarded mode): the native fusion
against the numpy reference, the echo guard's runs, and what the default steering promises on the real model."""

from __future__ import annotations

import numpy as np
import pytest

from sda_local.engine import native
from sda_local.engine.fusion import fuse_numpy
from sda_local.engine.steering import DEFAULT_STEERING, PAPER, EchoTracker, Steering, fuse_steered_numpy
from sda_local.errors import InputError

from fusion_cases import copy_and_discouraged_rows, random_pair

STEERINGS = [Steering("guarded", clip=1.0, echo_run=2), Steering("guarded", clip=0.5, plausibility=0.1),
             Steering("guarded", echo_run=3), Steering("guarded", plausibility=0.05),
             Steering("guarded", echo_run=2, guard_to="prompt"),
             Steering("guarded", clip=1.0, plausibility=0.1, echo_run=2, guard_to="prompt")]


def lib():
    handle = native.library()
    assert handle is not None, native.load_error()
    return handle


def assert_close(native_out, numpy_out):
    (a, ta, ja), (b, tb, jb) = native_out, numpy_out
    assert np.array_equal(np.isfinite(a), np.isfinite(b))
    finite = np.isfinite(b)
    assert np.abs(np.exp(a[finite]) - np.exp(b[finite])).max() < 1e-5
    assert abs(ta - tb) < 1e-5 and abs(ja - jb) < 1e-5


@pytest.mark.parametrize("steering", STEERINGS, ids=str)
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("n", [3000, 49152])
def test_native_steered_fusion_matches_numpy(steering, strength, n):
    rng = np.random.default_rng(n + int(strength * 10))
    z_with, z_without = random_pair(rng, n)
    guarded = rng.integers(0, n, 12)
    for mode in ("paper", "reference", "fixed"):
        assert_close(native.fuse_steered(lib(), z_with, z_without, strength, 2.0, 0.6, {"paper": 0, "reference": 1,
                                                                                        "fixed": 2}[mode],
                                         steering, guarded),
                     fuse_steered_numpy(z_with, z_without, strength, steering, guarded, k=2.0, t0=0.6,
                                        temperature_mode=mode))


def test_masked_tokens_follow_the_paper_rules_under_bounds():
    rng = np.random.default_rng(5)
    z_with, z_without = random_pair(rng, 5000)
    z_without[::7] = -np.inf  # impossible without the instruction only: unsteered
    z_with[::11] = -np.inf  # impossible with it: stays impossible
    guarded = np.array([0, 11, 14, 22])  # 0, 11 and 22 are masked with; 14 without
    for guard_to in ("without", "prompt"):
        steering = Steering("guarded", clip=1.0, echo_run=2, guard_to=guard_to)
        out = native.fuse_steered(lib(), z_with, z_without, 1.0, 2.0, 0.6, 0, steering, guarded)
        assert_close(out, fuse_steered_numpy(z_with, z_without, 1.0, steering, guarded, k=2.0, t0=0.6,
                                             temperature_mode="paper"))
        assert np.isneginf(out[0][::11]).all()
        # guarded, impossible without the instruction: l_without = -inf, or unsteered (l_with) under "prompt"
        assert np.isneginf(out[0][14]) == (guard_to == "without")


def test_guard_to_prompt_never_amplifies_a_guarded_token():
    # Token 3 is the copy (likely with the instruction, unlikely without); token 4 is one the instruction
    # discourages. Guarded to "prompt", 3 gets no more than l_with (relative to an unguarded, unsteered token)
    # and 4 keeps its suppression; guarded to "without", 3 falls to l_without.
    z_with, z_without = copy_and_discouraged_rows()
    common = dict(k=2.0, t0=1.0, temperature_mode="fixed")
    guarded = np.array([3, 4])
    free = fuse_steered_numpy(z_with, z_without, 1.0, Steering("guarded", echo_run=2), None, **common)[0]
    prompt = fuse_steered_numpy(z_with, z_without, 1.0, Steering("guarded", echo_run=2, guard_to="prompt"),
                                guarded, **common)[0]
    without = fuse_steered_numpy(z_with, z_without, 1.0, Steering("guarded", echo_run=2), guarded, **common)[0]
    lp = z_with - np.log(np.exp(z_with).sum())
    lq = z_without - np.log(np.exp(z_without).sum())
    assert prompt[3] - prompt[0] == pytest.approx(lp[3] - (lp[0] + 2.0 * (lp[0] - lq[0])), abs=1e-4)
    assert prompt[4] - prompt[0] == pytest.approx(free[4] - free[0], abs=1e-4)  # already below prompting
    assert without[3] - without[0] == pytest.approx(lq[3] - (lp[0] + 2.0 * (lp[0] - lq[0])), abs=1e-4)
    assert free[3] > prompt[3] > without[3]
    for mode in ("prompt", "without"):
        steering = Steering("guarded", echo_run=2, guard_to=mode)
        assert_close(native.fuse_steered(lib(), z_with, z_without, 1.0, 2.0, 1.0, 2, steering, guarded),
                     fuse_steered_numpy(z_with, z_without, 1.0, steering, guarded, **common))


def test_zero_bounds_are_the_paper_formula_bit_for_bit():
    rng = np.random.default_rng(9)
    z_with, z_without = random_pair(rng, 49152)
    for strength in (0.0, 0.5, 2.0):
        paper = native.fuse(lib(), z_with, z_without, strength, 2.0, 0.6, 0)
        zero = native.fuse_steered(lib(), z_with, z_without, strength, 2.0, 0.6, 0, Steering("guarded"), [])
        assert np.array_equal(paper[0], zero[0]) and paper[1:] == zero[1:]


def test_bounds_and_guard_do_nothing_at_zero_strength():
    rng = np.random.default_rng(3)
    z_with, z_without = random_pair(rng, 8000)
    plain = fuse_numpy(z_with, z_without, 0.0)
    for steering in STEERINGS:
        out = native.fuse_steered(lib(), z_with, z_without, 0.0, 2.0, 0.6, 0, steering, np.arange(50))
        assert np.abs(out[0] - plain[0]).max() < 1e-5


def test_clip_bounds_the_steering_term():
    # One token the without-stream finds nearly impossible: the paper's formula gives it +g * 15 nats, the
    # clipped one at most +g * c.
    z_with = np.zeros(100, dtype=np.float32)
    z_without = np.zeros(100, dtype=np.float32)
    z_without[7] = -15.0
    paper = fuse_numpy(z_with, z_without, 1.0, temperature_mode="fixed")[0]
    clipped = fuse_steered_numpy(z_with, z_without, 1.0, Steering("guarded", clip=1.0), k=2.0, t0=0.6,
                                 temperature_mode="fixed")[0]
    assert np.exp(paper[7]) > 0.99
    d_other = np.log(99 + np.exp(-15.0)) - np.log(100.0)  # l_with - l_without of every other token
    assert clipped[7] - clipped[0] == pytest.approx(2.0 * (1.0 - d_other) / 0.6, abs=1e-4)  # g (c - d) / T


def test_echo_tracker_finds_runs_of_the_instruction():
    tracker = EchoTracker([(5, 6, 7, 8), (9, 6, 7)], run=2)
    assert sorted(tracker.guarded().tolist()) == []  # nothing copied yet: a run of 1 is free
    tracker.accept(6)  # the answer ends "6": 7 would make the run "6 7" in both sources
    assert sorted(tracker.guarded().tolist()) == [7, 7]
    tracker.accept(7)
    assert tracker.guarded().tolist() == [8]  # only the first source continues after "6 7"
    tracker.accept(1)
    assert tracker.guarded().tolist() == []
    three = EchoTracker([(5, 6, 7, 8)], run=3)
    for t in (5, 6):
        three.accept(t)
    assert three.guarded().tolist() == [7]


@pytest.mark.parametrize("guard_to", ["without", "prompt"])
def test_native_echo_guard_follows_the_answer(engine, guard_to):
    # The same generation with the native sampler and the numpy reference: the guard's runs come from the
    # accepted tokens, so the two agree token for token where the fused distributions agree.
    from sda_local import SDAEngine

    query = "Why do people get hiccups?"
    instruction = "Finish your response with this exact phrase Is there anything else I can help with?"
    steering = Steering("guarded", clip=1.0, echo_run=2, guard_to=guard_to)
    native_result = engine.generate(query, instruction, strength=1.0, steering=steering, seed=11, max_tokens=40)
    assert native_result.stats.fusion_backend == "native"
    with SDAEngine(str(engine.model_path), n_ctx=1024, n_threads=2, fusion_backend="numpy") as numpy_engine:
        numpy_result = numpy_engine.generate(query, instruction, strength=1.0, steering=steering, seed=11,
                                             max_tokens=40)
    assert numpy_result.stats.fusion_backend == "numpy"
    assert native_result.tokens == numpy_result.tokens
    # ... and the guard did something: without it (echo_run 0) the same seed gives another answer.
    unguarded = engine.generate(query, instruction, strength=1.0, steering=Steering("guarded", clip=1.0), seed=11,
                                max_tokens=40)
    assert unguarded.tokens != native_result.tokens


def test_guard_stops_the_copy_that_the_paper_formula_makes(engine):
    # IFEval instructions the paper's formula (a = 0.5, its temperature) recited in most answers of the tuning
    # questions; the default steering at its pipeline's a recites them far less. 12 generations per arm, together.
    from sda_local.judging.selfscore import A_MAX

    pytest.importorskip("if_verifiable")
    from sda_local.evaluation import ifeval, quality
    from sda_local.evaluation.datasets import DEV_SET, load_dataset
    from sda_local.seeds import derive_seed

    questions = dict(load_dataset(DEV_SET).items)
    echoes = {"paper": 0, "default": 0}
    for type_id in ("keywords:frequency", "detectable_format:constrained_response",
                    "detectable_format:multiple_sections", "keywords:forbidden_words"):
        for index in (20, 21, 22):
            seed = derive_seed(0, index)
            case = ifeval.make_case(type_id, questions[index], seed)
            for arm, options in (("paper", dict(strength=0.5, steering=PAPER, temperature_mode="paper")),
                                 ("default", dict(strength=A_MAX))):
                text = engine.generate(questions[index], case.instruction, seed=seed, max_tokens=64, **options).text
                echoes[arm] += quality.echo(text, case.instruction, questions[index], case.required_texts()).echoed
    assert echoes["paper"] >= 6, echoes
    assert echoes["default"] <= echoes["paper"] // 2, echoes


def test_steering_values_are_checked(engine):
    for bad in (Steering("nope"), Steering("guarded", clip=-1.0), Steering("guarded", plausibility=1.0),
                Steering("guarded", echo_run=-2), Steering("guarded", clip=float("nan")),
                Steering("paper", clip=1.0), Steering("guarded", echo_run=2, guard_to="nowhere")):
        with pytest.raises(InputError):
            engine.generate("Hi", "Answer briefly.", strength=0.5, steering=bad, max_tokens=2, seed=0)
    with pytest.raises(InputError):
        Steering("paper", echo_run=2).check()  # the paper's formula has no guard
