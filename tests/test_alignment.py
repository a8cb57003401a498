"""SDA amplifies instructions: verifiable instructions over 24 TruthfulQA questions, fixed seeds.

Measured on the default model (SmolLM2-135M-Instruct Q4_1, 2 threads): "fewer than 25 words" 15/24 with
prompting alone vs 24/24 with the paper's method at a = 0.5; "no commas" 8/24 vs 20/24. The default steering
at its pipeline's a (the self judge's A_MAX) gives up some of that compliance for no echo of the instruction
and fewer loops (README, "Steering without echo"), and its gain depends on the CPU's rounding: on an AMD EPYC
(AVX2) "fewer than 25 words" 19/24 prompting alone and 19/24 default, "no commas" 7/24 and 11/24; on CI's
machine "no commas" 8/24 and 12/24. So the default is held to a pooled gain over both instructions, and to
no instruction clearly below prompting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sda_local.engine.steering import PAPER
from sda_local.judging.selfscore import A_MAX

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa.jsonl"
CHECKS = {
    "Answer in fewer than 25 words.": lambda text: len(text.split()) < 25,
    "Do not use any commas in your answer.": lambda text: "," not in text,
}
PAPER_MARGIN = 5  # per instruction, the paper's method
DEFAULT_POOLED_MARGIN = 3  # over both instructions (48 answers), the default
DEFAULT_SLACK = 2  # no instruction more than this below prompting alone, the default


def questions(n=24):
    if not DATA.is_file():
        if os.environ.get("CI"):  # CI has ../shared beside the clone: a missing file is a failure there
            pytest.fail(f"evaluation data not found at {DATA}")
        pytest.skip(f"evaluation data not found at {DATA}")
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line)["Question"] for line in f][:n]


def counts(engine, instruction, **steered):
    """(prompting alone, SDA) compliant answers of the 24, the same seed per question in both arms."""
    check = CHECKS[instruction]
    prompt_only = sda = 0
    for i, question in enumerate(questions()):
        base = engine.generate(question, instruction, strength=0.0, temperature_mode="fixed", seed=100 + i,
                               max_tokens=80)
        answer = engine.generate(question, instruction, seed=100 + i, max_tokens=80, **steered)
        prompt_only += check(base.text)
        sda += check(answer.text)
    return prompt_only, sda


@pytest.mark.slow
@pytest.mark.parametrize("instruction", list(CHECKS))
def test_the_papers_method_complies_more_often_than_prompting_alone(engine, instruction):
    prompt_only, sda = counts(engine, instruction, strength=0.5, steering=PAPER, temperature_mode="paper")
    print(f"{instruction!r}: prompting alone {prompt_only}/24, SDA (paper's method) {sda}/24")
    assert sda >= prompt_only + PAPER_MARGIN


@pytest.mark.slow
def test_the_default_complies_more_often_than_prompting_alone(engine):
    per_instruction = {instruction: counts(engine, instruction, strength=A_MAX) for instruction in CHECKS}
    print({instruction: f"prompting alone {p}/24, SDA (default) {s}/24"
           for instruction, (p, s) in per_instruction.items()})
    prompt_only = sum(p for p, _ in per_instruction.values())
    sda = sum(s for _, s in per_instruction.values())
    assert sda >= prompt_only + DEFAULT_POOLED_MARGIN
    assert all(s >= p - DEFAULT_SLACK for p, s in per_instruction.values())
