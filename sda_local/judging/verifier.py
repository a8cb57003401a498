"""Judges that check the first answer by program where the instruction allows it.

``VerifyJudge`` (``--judge verify``) reads the instruction with ``checks.parse_checks`` and checks the first
answer against it: a = 0 when the answer complies (prompting alone already does what was asked), A_MAX when
it does not (and the steered answer then has no onset: ``pipeline.steered_settings``). The first answer it
judges is *prompted* (generated with the instruction, a = 0), not the paper's answer without the instruction: what a decides is whether prompting needs steering, and a prompted answer
that complies is then the answer itself (the steered pass at a = 0 and the fixed temperature repeats it token
for token). An instruction it cannot check in full is a JudgeError.

``AutoJudge`` (``--judge auto``, the default) is the verify judge where the whole instruction is checkable,
and the self judge (the likelihood ratio, ``selfscore``) everywhere else: presets, free-form instructions.
"""

from __future__ import annotations

import time
from typing import Optional

from ..errors import InputError
from ..rubrics import Rubric
from .checks import check_answer, parse_checks
from .replies import Judgement, JudgeError, PairJudgement
from .selfscore import SelfJudge

VERSION = "verify-v1"
# a where the prompted first answer misses a checkable instruction. Chosen on the development questions 20-39
# (README, "Steering without echo"): with the steered answer's onset dropped after a miss, a = 0.5, 0.75, 1
# and 1.5 gave 53.8, 52.4, 52.8 and 50.6 % compliance, but 10.2, 7.0, 7.2 and 10.0 % degenerate answers
# (prompting alone: 33.6 % and 6.6 %); 1 is the highest compliance within 2 points of prompting's loops.
A_MAX = 1.0

UNCHECKABLE = ("verify judge: the instruction is not one a program can check in full (--judge auto uses the self "
               "judge for such instructions)")

# Which first answer a judge reads (pipeline.plan_alignment makes it):
FIRST_WITHOUT = "without"  # the paper's: generated without the instruction
FIRST_OBSERVED = "observed"  # without the instruction, both prompts decoded so that r is read as it goes
FIRST_PROMPTED = "prompted"  # with the instruction at a = 0: prompting alone


def checkable(alignment) -> bool:
    """Whether a program can check ``alignment``'s whole instruction."""
    return alignment is not None and parse_checks(alignment.instruction) is not None


class VerifyJudge:
    """Checks the prompted first answer against a verifiable instruction (see the module docstring)."""

    scoring = "verify"
    observes = False
    identity = "verify"

    def first_answer(self, alignment) -> str:
        if not checkable(alignment):  # refused before anything is generated
            raise InputError(UNCHECKABLE)
        return FIRST_PROMPTED

    def score(self, query: str, answer: str, rubric: Rubric, history=()) -> Judgement:
        alignment = rubric.alignment
        instruction = alignment.instruction if alignment is not None else None
        checks = parse_checks(instruction) if instruction else None
        if checks is None:
            raise JudgeError(UNCHECKABLE)
        started = time.perf_counter()
        results = check_answer(checks, answer, query)
        passed = sum(ok for _, ok in results)
        reply = "; ".join(f"{c.detail}: {'met' if ok else 'missed'}" for c, ok in results)
        score = round(100.0 * passed / len(results), 3)
        return Judgement(score, self.identity, VERSION, reply, time.perf_counter() - started, scoring="verify",
                         amplifier=0.0 if passed == len(results) else A_MAX)

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        raise JudgeError("the verify judge checks one answer against its instruction and cannot compare two: "
                         "pairwise judging needs --judge local or openai")

    def close(self) -> None:
        pass


class AutoJudge:
    """The verify judge for an instruction a program can check in full, the self judge for any other."""

    scoring = "auto"
    observes = True  # for the instructions the self judge takes

    def __init__(self, engine):
        self.self_judge = SelfJudge(engine)
        self.verify_judge = VerifyJudge()
        self.identity = f"auto:{engine.model_path.name}"

    def first_answer(self, alignment) -> str:
        return FIRST_PROMPTED if checkable(alignment) else FIRST_OBSERVED

    def score(self, query: str, answer: str, rubric: Rubric, history=()) -> Judgement:
        judge = self.verify_judge if checkable(rubric.alignment) else self.self_judge
        return judge.score(query, answer, rubric, history=history)

    def judgement(self, r: Optional[float], seconds: float = 0.0) -> Judgement:
        return self.self_judge.judgement(r, seconds)

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        raise JudgeError("the auto judge (verify or self) scores one answer and cannot compare two: "
                         "pairwise judging needs --judge local or openai")

    def close(self) -> None:
        pass


def observes(judge) -> bool:
    """Whether ``judge`` reads its score off an observed first answer (the self judge: its r)."""
    return bool(getattr(judge, "observes", False))


def first_answer_mode(judge, alignment) -> str:
    """Which first answer ``judge`` reads for ``alignment``: FIRST_PROMPTED, FIRST_OBSERVED or FIRST_WITHOUT."""
    choose = getattr(judge, "first_answer", None)
    if callable(choose):
        return choose(alignment)
    return FIRST_OBSERVED if observes(judge) else FIRST_WITHOUT
