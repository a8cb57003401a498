"""``SelfJudge``: the amplifier from the model's own likelihood ratio, with no judge at all.

The initial answer is teacher-forced after both prompts, with and without the instruction (two sequences
of one batched prefill), and

    r = mean over the answer's tokens of (log p_with(token) - log p_without(token))

says how much the instruction changes the answer's likelihood. An answer that already does what the
instruction asks is about as likely with it as without (r ~ 0); one that does not is less likely once the
model has read the instruction (r < 0). The paper lists scoring without an external judge as future work.

r sets the amplifier by a monotone map (``self_amplifier``): a = 0 while r >= -R_ZERO (the instruction does
not make the answer less likely), then linear up to A_MAX at r = -R_FULL and beyond. Both constants come from
TruthfulQA questions 0-59 (README, "Choosing the judge"; the numbers it reports come from other questions):

* A_MAX = 0.5, the fixed a chosen for the default steering (parts read, directive capped, onset 8) on the
  IFEval development questions 20-39 (README, "Steering without echo": compliance 42.0 % at a = 0.5 and 44.6 %
  at 1.0, but clean compliance 36.2 % against 28.6 %, fluency -1.74 against -2.58, and at 1.0 a type 10 points
  below prompting alone). It was 1.0 for the echo guard alone (self-v2) and 0.5 for the paper's formula (v1).
* R_FULL = 0.05: the 10th percentile of -r over the 409 first answers that missed their instruction (median
  0.112): nine in ten of them get the full amplifier, and one the instruction barely changes gets less.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..errors import InputError, ModelError
from ..rubrics import Rubric
from .replies import Judgement, JudgeError, PairJudgement

VERSION = "self-v3"  # v3: A_MAX 0.5 for the instruction-reading steering (v2: 1.0, v1: 0.5)
A_MAX = 0.5
R_ZERO = 0.0
R_FULL = 0.05


def self_amplifier(r: float) -> float:
    """a in [0, A_MAX] from the likelihood ratio r: 0 for r >= -R_ZERO, growing linearly as r falls."""
    return A_MAX * float(np.clip((-r - R_ZERO) / (R_FULL - R_ZERO), 0.0, 1.0))


class SelfJudge:
    """Scores an answer by how much the instruction changes its likelihood under the engine's own model."""

    scoring = "self"
    observes = True  # the pipeline can generate the first answer observed and hand r to judgement()

    def __init__(self, engine):
        self.engine = engine
        self.identity = f"self:{engine.model_path.name}"

    def ratio(self, query: str, answer: str, alignment, history=()) -> float:
        """r of ``answer`` to ``query`` under ``alignment``'s instruction (see the module docstring), after the
        conversation's earlier (user, assistant) turns ``history``: the prompts of the SDA pass itself."""
        engine = self.engine
        answer_tokens = engine.model.tokenize(answer, add_bos=False, special=False)
        if not answer_tokens:
            raise JudgeError("self judge: the answer is empty, so it has no likelihood to compare")
        prompt_with, prompt_without = engine.formatter.pair(query, alignment, history)
        try:
            prompts = [engine.tokenize_prompt(prompt_with), engine.tokenize_prompt(prompt_without)]
            with engine.forcing() as forcing:
                with_, without = forcing.continuation_logprobs(prompts, answer_tokens)
        except (ModelError, InputError) as exc:  # non-finite logits, a failed decode; an answer too long
            raise JudgeError(f"self judge: {exc}") from None
        return float(np.mean(with_ - without))

    def score(self, query: str, answer: str, rubric: Rubric, history=()) -> Judgement:
        if rubric.alignment is None:
            raise JudgeError("self judge: it needs the alignment instruction, which this rubric does not carry")
        started = time.perf_counter()
        r = self.ratio(query, answer, rubric.alignment, history)
        return self.judgement(r, time.perf_counter() - started)

    def judgement(self, r: Optional[float], seconds: float = 0.0) -> Judgement:
        """The judgement of a ratio r already known: read off the first answer as it was generated (an
        observed generation, SDAEngine.stream(observe=True), records it), so nothing is teacher-forced."""
        if r is None:
            raise JudgeError("self judge: the answer is empty, so it has no likelihood to compare")
        return Judgement(round(r, 6), self.identity, VERSION, f"r = {r:.6f}", seconds, scoring="self",
                         amplifier=self_amplifier(r))

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        raise JudgeError("the self judge scores one answer against its instruction and cannot compare two: "
                         "pairwise judging needs --judge local or openai")

    def close(self) -> None:
        pass
