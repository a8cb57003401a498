"""SDA amplifies instructions: verifiable instructions over 24 TruthfulQA questions, fixed seeds.

Measured on the default model (SmolLM2-135M-Instruct Q4_1, 2 threads): "fewer than 25 words" 15/24 with
prompting alone vs 24/24 with the paper's method at a = 0.5; "no commas" 8/24 vs 20/24. The default steering
at its pipeline's a (the self judge's A_MAX, see STEERED): printed by the test, asked for the same margin of 5.
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
MARGIN = 5
STEERED = {  # arm: generation options
    "paper's method": dict(strength=0.5, steering=PAPER, temperature_mode="paper"),
    "default": dict(strength=A_MAX),
}


def questions(n=24):
    if not DATA.is_file():
        if os.environ.get("CI"):  # CI has ../shared beside the clone: a missing file is a failure there
            pytest.fail(f"evaluation data not found at {DATA}")
        pytest.skip(f"evaluation data not found at {DATA}")
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line)["Question"] for line in f][:n]


@pytest.mark.slow
@pytest.mark.parametrize("arm", list(STEERED))
@pytest.mark.parametrize("instruction", list(CHECKS))
def test_sda_complies_more_often_than_prompting_alone(engine, instruction, arm):
    check = CHECKS[instruction]
    prompt_only = sda = 0
    for i, question in enumerate(questions()):
        base = engine.generate(question, instruction, strength=0.0, temperature_mode="fixed", seed=100 + i,
                               max_tokens=80)
        steered = engine.generate(question, instruction, seed=100 + i, max_tokens=80, **STEERED[arm])
        prompt_only += check(base.text)
        sda += check(steered.text)
    print(f"{instruction!r}: prompting alone {prompt_only}/24, SDA ({arm}) {sda}/24")
    assert sda >= prompt_only + MARGIN
