"""Scores read from the model's distribution: teacher forcing, expected-value local scoring, the self judge,
their CLI, and judge-bench, each checked against an independent computation.

The oracle is llama-cpp-python's high-level ``Llama`` class on the same GGUF file: its own context, its own
batching, its own logits buffer. It is built with the kernels the engine uses (flash attention as llama.cpp's
"auto" resolves it on CPU, ubatch of layout.exact_ubatch() rows): with the other kernels the same prompt's
log-probabilities differ by up to 0.5 nats on this Q4 model, which would say nothing about the code under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import run_cli
from sda_local import SDAEngine
from sda_local.evaluation.judge_bench import Cache, auc, distinct_deciles
from sda_local.errors import InputError
from sda_local.judging import JudgeError, LocalJudge, SelfJudge, self_amplifier
from sda_local.judging.selfscore import A_MAX, R_FULL, R_ZERO
from sda_local.judging.verifier import A_MAX as VERIFY_A
from sda_local.prompts import resolve_alignment
from sda_local.rubrics import RUBRICS, judge_messages, pairwise_messages, rubric_for
from sda_local.engine.layout import N_BATCH, exact_ubatch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QUERY = "How do I boil an egg?"
ANSWER = "Put the egg in boiling water for nine minutes, then cool it in cold water."
NO_COMMAS = "Do not use any commas in your answer."
DIGITS = np.arange(1, 10, dtype=np.float64)
# One thread everywhere: on a busy 2-core machine two spinning llama.cpp threads run many times slower, and
# nothing checked here depends on the thread count.
THREADS = 1


def data(name):
    path = DATA / name
    if not path.is_file():
        if os.environ.get("CI"):  # CI has ../shared beside the clone: a missing file is a failure there
            pytest.fail(f"evaluation data not found at {path}")
        pytest.skip(f"evaluation data not found at {path}")
    return path


# ---------------------------------------------------------------------------------------------- the oracle
class Oracle:
    """Full log-softmax rows of a token sequence, from llama-cpp-python's own Llama class."""

    def __init__(self, model_path):
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=1024, n_batch=N_BATCH, n_ubatch=exact_ubatch(),
                                   n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, logits_all=True,
                                   verbose=False)

    def tokenize(self, text: str):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def rows(self, tokens, keep: int = 0):
        """log p(. | tokens[:i+1]) for every i >= keep; the first ``keep`` tokens are those of the previous
        call, reused from the cache (Llama.eval drops the cache past n_tokens)."""
        if keep:
            assert list(self.llm.input_ids[:keep]) == list(tokens[:keep])
        self.llm.n_tokens = keep
        self.llm.eval(list(tokens[keep:]))
        rows = np.asarray(self.llm.scores[:len(tokens)], dtype=np.float64)
        return rows - logsumexp(rows, axis=1, keepdims=True)

    def digit_distribution(self, row):
        """p(1..9) renormalised over the digit tokens, and the share they held."""
        ids = [self.digit(d) for d in range(1, 10)]
        lp = row[ids]
        return np.exp(lp - logsumexp(lp)), float(np.exp(logsumexp(lp)))

    def digit(self, d: int) -> int:
        (token,) = self.tokenize(str(d))
        return token

    def continuation(self, prompt, continuation):
        """log p(continuation[i] | prompt + continuation[:i])."""
        rows = self.rows(list(prompt) + list(continuation))
        n = len(prompt)
        return rows[np.arange(n - 1, n - 1 + len(continuation)), continuation]


@pytest.fixture(scope="module")
def engine(model_path):
    """This module's engine (conftest's, with one thread)."""
    with SDAEngine(str(model_path), n_ctx=2048, n_threads=THREADS, streams="batched") as e:
        yield e


@pytest.fixture(scope="module")
def oracle(model_path):
    o = Oracle(model_path)
    yield o
    o.llm.close()


def rescale(e):
    return 1 + (e - 1) * 99 / 8


def prompt_of(engine, messages):
    system, user = (m["content"] for m in messages)
    return engine.tokenize_prompt(engine.formatter.render(system, user))


# ---------------------------------------------------------------------------------------------- forcing
def test_continuation_logprobs_are_teacher_forced_token_by_token(engine, oracle):
    forcing = engine.forcing()
    prompts = [engine.tokenize_prompt(engine.formatter.render("Be brief.", "Name a fruit.")),
               engine.tokenize_prompt(engine.formatter.render(None, "Name a fruit. Answer in one word."))]
    cont = engine.model.tokenize("An apple, because it is sweet.", add_bos=False, special=False)
    got = forcing.continuation_logprobs(prompts, cont)
    assert [g.shape for g in got] == [(len(cont),)] * 2
    assert np.all(np.concatenate(got) <= 0) and not np.allclose(got[0], got[1])  # the two prompts differ
    for prompt, row in zip(prompts, got):
        # One sequence, one position at a time, through the same context...
        one_by_one = [forcing.next_logprobs(prompt + cont[:i], [cont[i]])[0] for i in range(len(cont))]
        np.testing.assert_allclose(row, one_by_one, atol=1e-4)
        # ...and through another implementation altogether.
        np.testing.assert_allclose(row, oracle.continuation(prompt, cont), atol=1e-4)

    # Whatever the context held before, the same call gives the same numbers: something longer in both
    # sequences, a branch left in sequence 0.
    other = engine.tokenize_prompt(engine.formatter.render("You are a pirate.", "Tell me about the sea " * 8))
    forcing.continuation_logprobs([other, other[:20]], cont + cont)
    forcing.branch_logprobs(0, 10, other[10:30], [1, 2, 3])
    again = forcing.continuation_logprobs(prompts, cont)
    for first, second in zip(got, again):
        np.testing.assert_allclose(second, first, atol=1e-5)
    # One prompt is a single sequence; an empty continuation has no log-probabilities.
    (single,) = forcing.continuation_logprobs(prompts[1:], cont)
    np.testing.assert_allclose(single, got[1], atol=1e-4)
    assert [len(x) for x in forcing.continuation_logprobs(prompts, [])] == [0, 0]


# ---------------------------------------------------------------------------------------------- expected
def test_expected_score_is_the_exact_mean_of_the_digit_distribution(engine, oracle):
    rubric = rubric_for(resolve_alignment("helpfulness"))
    judgement = LocalJudge(engine, scoring="expected").score(QUERY, ANSWER, rubric)

    prompt = prompt_of(engine, judge_messages(rubric, QUERY, ANSWER, 9))
    prefix = oracle.tokenize('{"score": ')
    # The judge's reply tokenises with each digit as a token of its own after that prefix.
    for d in range(1, 10):
        assert oracle.tokenize('{"score": %d}' % d)[:len(prefix) + 1] == prefix + [oracle.digit(d)]
    p, coverage = oracle.digit_distribution(oracle.rows(prompt + prefix)[-1])
    mean = float(p @ DIGITS)
    std = float(np.sqrt(p @ (DIGITS - mean) ** 2))

    assert judgement.scoring == "expected" and judgement.rubric_version.endswith("/scale-9")
    assert judgement.score == pytest.approx(rescale(mean), abs=2e-3)
    assert judgement.spread == pytest.approx(std * 99 / 8, abs=2e-3)
    np.testing.assert_allclose(judgement.distribution, p, atol=2e-5)
    assert judgement.coverage == pytest.approx(coverage, abs=2e-4)
    assert sum(judgement.distribution) == pytest.approx(1.0, abs=1e-4) and len(judgement.distribution) == 9
    assert judgement.spread > 0 and 1 <= judgement.score <= 100 and isinstance(judgement.score, float)
    assert 0 < judgement.coverage <= 1

    # Deterministic, including after other work on the same context.
    LocalJudge(engine).score("What is 2 + 2?", "5", rubric_for(resolve_alignment("honesty")))
    again = LocalJudge(engine).score(QUERY, ANSWER, rubric)
    assert (again.score, again.distribution, again.spread) == (judgement.score, judgement.distribution,
                                                              judgement.spread)


def test_greedy_scoring_reads_an_integer_reply(engine):
    judgement = LocalJudge(engine, scoring="greedy").score(QUERY, ANSWER, rubric_for(resolve_alignment("helpfulness")))
    assert judgement.scoring == "greedy" and type(judgement.score) is int and 1 <= judgement.score <= 100
    assert json.loads(judgement.raw) == {"score": judgement.score}
    assert judgement.spread is None and judgement.distribution is None
    with pytest.raises(InputError, match="bogus"):
        LocalJudge(engine, scoring="bogus")


def test_pair_expected_scores_enumerate_the_second_score_per_first_digit(engine, oracle):
    """Each order's slots: the first score's mean, and sum_d p(d) E[second | d]; the pair averages both orders."""
    rubric = rubric_for(resolve_alignment("helpfulness"))
    worse = "Eggs are birds."
    pair = LocalJudge(engine).score_pair(QUERY, ANSWER, worse, rubric)

    def slot_means(first, second):
        prompt = prompt_of(engine, pairwise_messages(rubric, QUERY, first, second, 9))
        prefix_a = oracle.tokenize('{"score_a": ')
        keep = len(prompt) + len(prefix_a)
        p_a, _ = oracle.digit_distribution(oracle.rows(prompt + prefix_a)[-1])
        mean_b = 0.0
        for d, p_d in zip(range(1, 10), p_a):
            branch = oracle.tokenize('{"score_a": %d, "score_b": ' % d)
            assert branch[:len(prefix_a) + 1] == prefix_a + [oracle.digit(d)]
            p_b, _ = oracle.digit_distribution(oracle.rows(prompt + branch, keep=keep)[-1])
            mean_b += p_d * float(p_b @ DIGITS)
        return rescale(float(p_a @ DIGITS)), rescale(mean_b)

    (answer_first, worse_second), (worse_first, answer_second) = slot_means(ANSWER, worse), slot_means(worse, ANSWER)
    assert answer_first != pytest.approx(answer_second, abs=0.5)  # the position matters to this judge...
    assert pair.score_a == pytest.approx((answer_first + answer_second) / 2, abs=2e-3)  # ...so both are averaged
    assert pair.score_b == pytest.approx((worse_second + worse_first) / 2, abs=2e-3)
    assert pair.rubric_version.endswith("/scale-9") and pair.raw.startswith("a first: p(1..9) = ")
    assert "; b first: p(1..9) = " in pair.raw and pair.tie_margin > 0


# ---------------------------------------------------------------------------------------------- self
def test_self_score_is_the_mean_log_likelihood_ratio(engine, oracle):
    alignment = resolve_alignment(NO_COMMAS)
    judgement = SelfJudge(engine).score(QUERY, ANSWER, rubric_for(alignment))

    prompt_with, prompt_without = engine.formatter.pair(QUERY, alignment)
    answer = oracle.tokenize(ANSWER)
    r = float(np.mean(oracle.continuation(engine.tokenize_prompt(prompt_with), answer)
                      - oracle.continuation(engine.tokenize_prompt(prompt_without), answer)))
    assert abs(r) > 0.01  # the instruction changes this answer's likelihood: a real signal to compare
    assert judgement.score == pytest.approx(r, abs=1e-3)
    assert judgement.scoring == "self" and judgement.judge.startswith("self:")
    assert judgement.amplifier == pytest.approx(self_amplifier(judgement.score), abs=1e-4)
    assert 0 <= judgement.amplifier <= A_MAX
    # A preset's rubric carries its alignment too.
    assert SelfJudge(engine).score(QUERY, ANSWER, rubric_for(resolve_alignment("honesty"))).scoring == "self"


def test_self_judge_refusals(engine):
    judge = SelfJudge(engine)
    rubric = rubric_for(resolve_alignment(NO_COMMAS))
    with pytest.raises(JudgeError, match="cannot compare two"):
        judge.score_pair(QUERY, ANSWER, "Boil it.", rubric)
    with pytest.raises(JudgeError, match="empty"):
        judge.score(QUERY, "", rubric)
    with pytest.raises(JudgeError, match="alignment"):
        judge.score(QUERY, ANSWER, RUBRICS["helpfulness"])  # a bare rubric has no instruction to compare with
    # An answer longer than the context is a judge failure (the pipeline's --on-judge-failure applies), for
    # the self judge and for expected scoring alike.
    with pytest.raises(JudgeError, match="context"):
        judge.score(QUERY, "egg " * 2100, rubric)
    with pytest.raises(JudgeError, match="context"):
        LocalJudge(engine).score(QUERY, "egg " * 2100, rubric)


def test_self_amplifier_map():
    assert self_amplifier(0.5) == self_amplifier(0.0) == self_amplifier(-R_ZERO) == 0.0
    assert self_amplifier(-R_FULL) == pytest.approx(A_MAX) and self_amplifier(-5.0) == A_MAX
    assert self_amplifier(-(R_ZERO + R_FULL) / 2) == pytest.approx(A_MAX / 2)  # linear in between
    rs = np.linspace(-1.0, 0.5, 1501)
    a = np.array([self_amplifier(r) for r in rs])
    assert np.all(np.diff(a) <= 0) and a.min() == 0.0 and a.max() == A_MAX
    assert 0 <= R_ZERO < R_FULL and 0 < A_MAX <= 1


# ---------------------------------------------------------------------------------------------- CLI
def judge_cli(model_path, *extra, answer=ANSWER, align=NO_COMMAS):
    return run_cli("judge", QUERY, answer, "--align", align, "--json", "--model", str(model_path),
                   "--threads", str(THREADS), *extra)


def test_cli_judge_self(model_path, engine):
    proc = judge_cli(model_path, "--judge", "self")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data["score"], float) and data["scoring"] == "self"
    assert data["judge"].startswith("self:") and data["amplifier_map"] is None
    assert 0 <= data["amplifier"] <= 1 and data["amplifier"] == pytest.approx(self_amplifier(data["score"]), abs=1e-4)
    library = SelfJudge(engine).score(QUERY, ANSWER, rubric_for(resolve_alignment(NO_COMMAS)))
    assert data["score"] == pytest.approx(library.score, abs=1e-4)


def test_cli_judge_scorings(model_path):
    proc = judge_cli(model_path, "--judge", "local", "--judge-scoring", "greedy")
    assert proc.returncode == 0, proc.stderr
    greedy = json.loads(proc.stdout)
    assert type(greedy["score"]) is int and greedy["scoring"] == "greedy" and greedy["distribution"] is None

    proc = judge_cli(model_path, "--judge", "local")  # expected is the default
    assert proc.returncode == 0, proc.stderr
    expected = json.loads(proc.stdout)
    assert expected["scoring"] == "expected" and isinstance(expected["score"], float)
    assert isinstance(expected["spread"], float) and len(expected["distribution"]) == 9
    assert expected["amplifier_map"] == "sigmoid" and 0 <= expected["amplifier"] <= 1
    assert expected["judge"].startswith("local:")

    proc = judge_cli(model_path, "--judge-scoring", "greedy")  # the default judge checks this one: scoring unused
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["judge"] == "verify" and verdict["amplifier"] == (0.0 if "," not in ANSWER else VERIFY_A)

    proc = judge_cli(model_path, "--judge-scoring", "bogus")
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in err and not proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--judge-scoring" in lines[0], err
    assert "'bogus' is not one of 'expected', 'greedy'" in lines[0], err


# ---------------------------------------------------------------------------------------------- judge-bench
def bench(model_path, cache, *extra):
    return run_cli("judge-bench", "-d", str(data("truthfulqa.jsonl")), "--limit", "2", "--questions", "2",
                   "--verify", "no_commas", "--spread-limit", "1", "-n", "24", "--judge", "self",
                   "--cache", str(cache), "--json", "--model", str(model_path), "--threads", str(THREADS),
                   *extra)


def test_judge_bench_runs_and_resumes_from_its_cache(model_path, tmp_path):
    cache = tmp_path / "cache.jsonl"
    proc = bench(model_path, cache)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["judge"].startswith("self:") and result["scoring"] == "self"
    t = result["truthfulqa"]
    assert t["n"] == 2 and t["failures"] == 0 and 0 <= t["accuracy"] <= 1 and type(t["ties"]) is int
    v = result["verifiable"]["no_commas"]
    assert v["n_answers"] == 6 and 0 <= v["n_compliant"] <= 6  # 2 questions x base, prompt, steered
    half = 100 // 2  # judge-bench's default --cases: up to half of each class is scored
    assert v["n_scored"] == min(half, v["n_compliant"]) + min(half, 6 - v["n_compliant"])
    assert v["auc"] is None or 0 <= v["auc"] <= 1
    a = result["amplifier"]
    assert a["n"] >= 1 and sum(a["histogram"]) == a["n"] and 1 <= a["distinct_deciles"] <= 10
    assert all(0 <= x <= 1 for x in a["values"])

    lines = cache.read_bytes().splitlines(keepends=True)
    # 6 answers + 1 initial answer, and a score per TruthfulQA answer, per scored case and per initial answer.
    assert len(lines) == 7 + 4 + v["n_scored"] + a["n"]
    assert all(line.endswith(b"\n") and json.loads(line)["key"] for line in lines)

    # Everything is reused: nothing appended, the same numbers.
    proc = bench(model_path, cache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == result
    assert cache.read_bytes().splitlines(keepends=True) == lines

    # A crash mid-write left half a line: it is dropped and that one record made again.
    cache.write_bytes(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    proc = bench(model_path, cache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == result
    repaired = cache.read_bytes().splitlines(keepends=True)
    assert repaired[:-1] == lines[:-1] and json.loads(repaired[-1]) == json.loads(lines[-1])


def test_judge_bench_needs_a_dataset(model_path, tmp_path):
    proc = run_cli("judge-bench", "--judge", "self", "--cache", str(tmp_path / "c.jsonl"), "--model",
                   str(model_path))
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--dataset" in lines[0], err
    assert not (tmp_path / "c.jsonl").exists()


# ---------------------------------------------------------------------------------------------- units
def test_auc_by_hand():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1], [1]) == 0.5
    # Pairs (2,1) win, (2,3) lose, (1,1) tie, (1,3) lose: 1.5 of 4.
    assert auc([2, 1], [1, 3]) == pytest.approx(0.375)
    assert auc([0.5, 0.5, 0.9], [0.5]) == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert auc([], [1]) is None and auc([1], []) is None


def test_distinct_deciles():
    assert distinct_deciles([0, 0.05, 0.15, 1.0]) == 3
    assert distinct_deciles([]) == 0
    assert distinct_deciles([0.95, 1.0]) == 1  # the top bin is closed
    assert distinct_deciles([i / 10 + 0.01 for i in range(10)]) == 10
    assert distinct_deciles([0, 50, 100], top=100) == 3


def test_cache_resumes_and_repairs(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = Cache(path)
    assert cache.get("a", lambda: {"x": 1}) == {"x": 1}
    assert cache.get("b", lambda: [2]) == [2]
    assert cache.get("a", lambda: pytest.fail("made again")) == {"x": 1}
    cache.close()
    whole = path.read_bytes()
    assert len(whole.splitlines()) == 2

    path.write_bytes(whole + b'{"key": "c", "val')  # interrupted mid-line
    cache = Cache(path)
    assert path.read_bytes() == whole
    assert cache.get("b", lambda: pytest.fail("made again")) == [2]
    assert cache.get("c", lambda: 3) == 3
    cache.close()
    assert path.read_bytes() == whole + b'{"key": "c", "value": 3}\n'

    path.write_bytes(whole + b"not json\n")
    with pytest.raises(InputError, match="line 3"):
        Cache(path)


def test_cache_that_cannot_be_read_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot"):
        Cache(tmp_path)  # --cache names a directory
