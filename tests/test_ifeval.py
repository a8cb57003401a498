"""The IFEval instructions (ifeval.py, the if-verifiable package). No model needed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("if_verifiable")

from sda_local.evaluation import ifeval  # noqa: E402


def test_every_ifeval_type_of_the_package_is_covered():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    assert set(ifeval.TYPES) == set(INSTRUCTION_DICT) and len(ifeval.TYPES) == 25


@pytest.mark.parametrize("type_id", ifeval.TYPES)
def test_ifeval_cases_are_seeded_and_checkable(type_id):
    a = ifeval.make_case(type_id, "Why is the sky blue?", 7)
    b = ifeval.make_case(type_id, "Why is the sky blue?", 7)
    assert a == b and a.instruction
    json.dumps(a.kwargs)  # recorded with each check
    assert ifeval.case_from_record(a.id, a.instruction, a.kwargs).check("Blue light scatters more.") == \
        a.check("Blue light scatters more.")
    assert a.check("") is False


def test_ifeval_checks_hold_on_known_answers():
    lower = ifeval.make_case("change_case:english_lowercase", "q", 0)
    assert lower.check("the sky is blue because air scatters blue light.")
    assert not lower.check("The sky is blue.")
    comma = ifeval.make_case("punctuation:no_comma", "q", 0)
    assert comma.check("No commas here.") and not comma.check("One, two.")
    sentences = ifeval.make_case("length_constraints:number_sentences", "q", 3)  # "less than 4" (seeded)
    assert sentences.kwargs == {"num_sentences": 4, "relation": "less than"}
    assert sentences.check("One. Two. Three.") and not sentences.check("One. Two. Three. Four. Five.")
    end = ifeval.make_case("startend:end_checker", "q", 3)
    assert end.check(f"Tides follow the moon. {end.kwargs['end_phrase']}")
    assert end.required_texts() == [end.kwargs["end_phrase"]]
    capitals = ifeval.make_case("change_case:capital_word_frequency", "q", 3)  # "less than 20" (seeded); needs
    assert capitals.kwargs == {"capital_frequency": 20, "capital_relation": "less than"}  # a word tokenizer offline
    assert capitals.check("A few WORDS in CAPITALS.") and not capitals.check("BIG " * 25)
    constrained = ifeval.make_case("detectable_format:constrained_response", "q", 0)
    assert set(ifeval.CONSTRAINED_OPTIONS) <= set(constrained.required_texts())
