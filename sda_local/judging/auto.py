"""``AutoJudge``, the default (``--judge auto``): the judge that steered best in our measurements for each kind
of alignment (README, "Choosing the judge").

* A custom instruction: the self judge. A small local judge cannot check "no commas" or "fewer than 40
  words" (it scores nearly every answer alike), while the likelihood ratio reads what the instruction
  changes in the model's own distribution.
* A preset (helpfulness, harmlessness, honesty, empathy, summarization): the local rubric judge with
  expected-value scoring, whose rubric says what the dimension means.
"""

from __future__ import annotations

from ..rubrics import Rubric
from .local import LocalJudge
from .replies import Judgement, PairJudgement
from .selfscore import SelfJudge


class AutoJudge:
    """Self for custom instructions, the local rubric judge for presets; both on the engine's own model."""

    scoring = "auto"

    def __init__(self, engine, *, scoring: str):
        self.self_judge = SelfJudge(engine)
        self.rubric_judge = LocalJudge(engine, scoring=scoring)
        self.identity = f"auto:{engine.model_path.name}"

    def judge_for(self, rubric: Rubric):
        custom = rubric.alignment is not None and rubric.alignment.preset is None
        return self.self_judge if custom else self.rubric_judge

    def score(self, query: str, answer: str, rubric: Rubric) -> Judgement:
        return self.judge_for(rubric).score(query, answer, rubric)

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        # Comparing two answers needs a rubric judge, whatever the alignment.
        return self.rubric_judge.score_pair(query, answer_a, answer_b, rubric)

    def close(self) -> None:
        self.rubric_judge.close()
