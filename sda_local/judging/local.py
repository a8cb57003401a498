"""``LocalJudge``: a GGUF model on this machine scores an answer under a rubric, in one of two ways.

* ``greedy``: decodes greedily under a grammar that admits only ``{"score": N}`` with N in 1..100. The mode
  of the judge's distribution: a small judge's mode sits on a few round numbers (100 for most answers), so
  it hardly discriminates.
* ``expected``: the exact mean of the judge's score distribution (G-Eval, arXiv 2303.16634; Wang, Zhang &
  Choi, arXiv 2503.03064: the mean beats the mode). The judge answers on a 1..9 scale; in common tokenizers
  each digit is one token, so the distribution of a score is one next-token distribution restricted to the
  nine digit tokens (what a grammar admitting only those digits samples from) and the "token tree" of the
  reply is enumerated exactly: one decode for a score, 1 + 9 for a pair of scores (the second score's
  distribution given each value of the first). The mean is rescaled linearly to 1..100 and its standard
  deviation recorded as the spread. Deterministic, and no sampling at all.

The generation model itself judges (no second copy of the weights), or another model (``owns_engine``).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import InputError, ModelError
from ..engine.fusion import NonFiniteLogitsError
from ..rubrics import DIGIT_SCALE_MAX, SCALE_MAX, Rubric, judge_messages, pairwise_messages
from ..engine.layout import common_prefix_length
from .replies import Judgement, JudgeError, PairJudgement, parse_judge_reply, parse_scores

SCORINGS = ("expected", "greedy")
DEFAULT_SCORING = "expected"
SCORE_GRAMMAR = r'''root ::= "{\"score\": " score "}"
score ::= "100" | [1-9] [0-9]? '''
PAIR_GRAMMAR = r'''root ::= "{\"score_a\": " score ", \"score_b\": " score "}"
score ::= "100" | [1-9] [0-9]? '''
DIGITS = tuple(range(1, DIGIT_SCALE_MAX + 1))
# Expected pair scores (1..100, each the mean of both orders) this close are a tie: a tenth of one step of
# the 1..9 scale the judge answers on (12.4 points per step).
PAIR_TIE_MARGIN = 1.24


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise InputError(f"unknown judge scoring {scoring!r} (choose from {', '.join(SCORINGS)})")
    return scoring


def rescale(digit_value: float) -> float:
    """A value on the 1..9 scale, linearly onto 1..100 (1 -> 1, 9 -> 100)."""
    return 1.0 + (digit_value - 1.0) * (SCALE_MAX - 1) / (DIGIT_SCALE_MAX - 1)


class _ReplyTree:
    """The token tree of a reply with ``n_slots`` digit scores: which token decides each score, after which
    forced tokens. Built once per judge from the tokenizer."""

    def __init__(self, model, template: str, n_slots: int):
        self.n_slots = n_slots
        self.replies: Dict[Tuple[int, ...], List[int]] = {
            values: model.tokenize(template.format(*values), add_bos=False, special=False)
            for values in itertools.product(DIGITS, repeat=n_slots)
        }

    def node(self, fixed: Tuple[int, ...]) -> Tuple[int, List[int]]:
        """(position of the token that decides the next score, that token for each digit) given the scores
        ``fixed`` so far. Raises JudgeError when a digit is not one token of its own."""
        group = {v: t for v, t in self.replies.items() if v[:len(fixed)] == fixed}
        first = next(iter(group.values()))
        at = min(common_prefix_length(first, t) for t in group.values())
        deciding = {}
        for values, tokens in group.items():
            digit = values[len(fixed)]
            if at >= len(tokens) or deciding.setdefault(digit, tokens[at]) != tokens[at]:
                raise _untokenizable()
        if len(set(deciding.values())) != len(DIGITS):
            raise _untokenizable()
        return at, [deciding[d] for d in DIGITS]


def _untokenizable() -> JudgeError:
    return JudgeError("expected scoring needs each score digit to be a token of its own, and this model's "
                      "tokenizer merges them: use --judge-scoring greedy")


def _distribution(logprobs: np.ndarray) -> Tuple[np.ndarray, float]:
    """The digits' probabilities renormalised (what a grammar admitting only them gives), and the share of the
    full distribution they held (how well the judge kept to the format)."""
    top = logprobs.max()
    weights = np.exp(logprobs - top)
    coverage = float(weights.sum() * math.exp(top))
    return weights / weights.sum(), coverage


def complete_with_grammar(engine, system: Optional[str], user: str, grammar: str, *, max_tokens: int = 32) -> str:
    """Greedy plain completion of [system, user] constrained by a GBNF grammar, through the engine's
    scheduler (a judgement is a short request like any other)."""
    request = engine.request(engine.render(system, user), None, max_tokens=max_tokens, seed=0, grammar=grammar,
                             greedy=True)
    job = engine.submit(request)
    engine.scheduler.wait(job)
    if job.error is not None:
        raise job.error
    return job.text


class LocalJudge:
    """Scores with a local GGUF model through an SDAEngine (``owns_engine``: close it with the judge)."""

    def __init__(self, engine, *, name: Optional[str] = None, owns_engine: bool = False,
                 scoring: str = DEFAULT_SCORING):
        self.engine = engine
        self.owns_engine = owns_engine
        self.scoring = check_scoring(scoring)
        self.identity = f"local:{name or engine.model_path.name}"
        self._trees: Dict[int, _ReplyTree] = {}

    # -- greedy ---------------------------------------------------------------------------------------
    def _complete(self, messages, grammar: str, max_tokens: int) -> str:
        system, user = (m["content"] for m in messages)
        try:
            return complete_with_grammar(self.engine, system, user, grammar, max_tokens=max_tokens)
        except NonFiniteLogitsError as exc:  # the judge model broke down (e.g. fp16 overflow on a GPU)
            raise JudgeError(f"local judge: {exc}") from None
        except InputError as exc:  # e.g. the answer does not fit in the judge's context
            raise JudgeError(f"local judge: {exc}") from None

    # -- expected -------------------------------------------------------------------------------------
    def _tree(self, n_slots: int) -> _ReplyTree:
        if n_slots not in self._trees:
            template = '{{"score": {}}}' if n_slots == 1 else '{{"score_a": {}, "score_b": {}}}'
            self._trees[n_slots] = _ReplyTree(self.engine.model, template, n_slots)
        return self._trees[n_slots]

    def _expected(self, messages, n_slots: int) -> Tuple[List[np.ndarray], float]:
        """Per score slot, its exact marginal distribution over 1..9; and the digits' mean coverage."""
        tree = self._tree(n_slots)
        system, user = (m["content"] for m in messages)
        try:
            prompt = self.engine.tokenize_prompt(self.engine.render(system, user))
            marginals = [np.zeros(len(DIGITS)) for _ in range(n_slots)]
            coverages = []

            def walk(fixed: Tuple[int, ...], weight: float, decoded: int) -> None:
                at, deciding = tree.node(fixed)
                reply = tree.replies[fixed + (1,) * (n_slots - len(fixed))]
                if fixed:  # after the parent's tokens, which stay in the cache
                    logprobs = forcing.branch_logprobs(0, len(prompt) + decoded, reply[decoded:at], deciding)
                else:
                    logprobs = forcing.branch_logprobs(0, 0, prompt + reply[:at], deciding)
                p, coverage = _distribution(logprobs)
                coverages.append(coverage)
                marginals[len(fixed)] += weight * p
                if len(fixed) + 1 < n_slots:
                    for digit, p_digit in zip(DIGITS, p):
                        walk(fixed + (digit,), weight * p_digit, at)

            with self.engine.forcing() as forcing:
                walk((), 1.0, 0)
        except (ModelError, InputError) as exc:  # non-finite logits, a failed decode; an answer too long
            raise JudgeError(f"local judge: {exc}") from None
        return marginals, float(np.mean(coverages))

    @staticmethod
    def _moments(p: np.ndarray) -> Tuple[float, float]:
        digits = np.asarray(DIGITS, dtype=np.float64)
        mean = float(p @ digits)
        std = float(np.sqrt(max(p @ (digits - mean) ** 2, 0.0)))
        return rescale(mean), std * (SCALE_MAX - 1) / (DIGIT_SCALE_MAX - 1)

    # -- the judge interface --------------------------------------------------------------------------
    def score(self, query: str, answer: str, rubric: Rubric, history=()) -> Judgement:
        started = time.perf_counter()
        if self.scoring == "greedy":
            reply = self._complete(judge_messages(rubric, query, answer, history=history), SCORE_GRAMMAR, 16)
            return Judgement(parse_judge_reply(reply), self.identity, rubric.version, reply,
                             time.perf_counter() - started, scoring="greedy")
        (p,), coverage = self._expected(judge_messages(rubric, query, answer, DIGIT_SCALE_MAX, history), 1)
        mean, spread = self._moments(p)
        return Judgement(round(mean, 3), self.identity, f"{rubric.version}/scale-{DIGIT_SCALE_MAX}",
                         _describe(p), time.perf_counter() - started, scoring="expected", spread=round(spread, 3),
                         distribution=[round(float(x), 5) for x in p], coverage=round(coverage, 4))

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        """Greedy: both answers in one prompt, as given. Expected: judged in both orders (A/B swapped) and
        averaged, so that what the position of an answer adds cancels out; scores within PAIR_TIE_MARGIN of
        each other are a tie."""
        started = time.perf_counter()
        if self.scoring == "greedy":
            reply = self._complete(pairwise_messages(rubric, query, answer_a, answer_b), PAIR_GRAMMAR, 32)
            a, b = parse_scores(reply, ("score_a", "score_b"))
            return PairJudgement(a, b, self.identity, rubric.version, reply, time.perf_counter() - started)
        means, replies = [0.0, 0.0], []
        for first, second in ((0, 1), (1, 0)):
            answers = (answer_a, answer_b)
            messages = pairwise_messages(rubric, query, answers[first], answers[second], DIGIT_SCALE_MAX)
            (p_first, p_second), _ = self._expected(messages, 2)
            means[first] += self._moments(p_first)[0] / 2
            means[second] += self._moments(p_second)[0] / 2
            replies.append(f"{'ab'[first]} first: {_describe(p_first)} / {_describe(p_second)}")
        return PairJudgement(round(means[0], 3), round(means[1], 3), self.identity,
                             f"{rubric.version}/scale-{DIGIT_SCALE_MAX}", "; ".join(replies),
                             time.perf_counter() - started, tie_margin=PAIR_TIE_MARGIN)

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()


def _describe(p: np.ndarray) -> str:
    """The distribution as a judge's "reply" for records: p(1..9)."""
    return "p(1..9) = " + " ".join(f"{x:.3f}" for x in p)
