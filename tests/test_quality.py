"""The quality metrics beside compliance (quality.py) and the IFEval instructions (ifeval.py). No model needed."""

from __future__ import annotations

import json

import pytest

from sda_local import ifeval, quality
from sda_local.datasets import DEV_SET, load_dataset


def test_echo_counts_runs_of_the_instruction_not_in_the_query():
    instruction = "Wrap your entire response with double quotation marks."
    assert quality.echo("Wrap your entire response with double quotation marks.", instruction).echoed
    assert quality.echo('"Tides come from the moon. Wrap your Entire, response now."', instruction).echoed
    # Three words in a row are not a run; an ordinary answer is not an echo.
    assert not quality.echo("Wrap your entire day in joy.", instruction).echoed
    assert not quality.echo('"The ocean is salty because rivers carry minerals into it."', instruction).echoed
    # A run that is in the query too is the query's, not the instruction's.
    query = "Why is the entire response with double meaning?"
    assert not quality.echo("the entire response with double meaning is ...", "Make the entire response with "
                            "double checks.", query).echoed


def test_echo_share_and_longest_run():
    e = quality.echo("one two three four five six seven eight", "x three four five six y")
    assert e.echoed and e.longest == 4 and e.share == pytest.approx(4 / 8)


def test_text_the_instruction_asks_for_is_not_echo():
    instruction = "Finish your response with this exact phrase Is there anything else I can help with?"
    answer = "Hiccups are spasms of the diaphragm. Is there anything else I can help with?"
    assert quality.echo(answer, instruction).echoed
    assert not quality.echo(answer, instruction, required=["Is there anything else I can help with?"]).echoed
    # ... but the rest of the instruction still is.
    assert quality.echo("Finish your response with this exact phrase.", instruction,
                        required=["Is there anything else I can help with?"]).echoed


def test_degeneration_flags_loops_and_not_lists():
    assert quality.degeneration("1. Pickle\n2. Pickle\n3. Pickle\n4. Pickle\n5. Pickle\n6. Pickle").degenerate
    loop = "The answer to this question is: " * 5
    assert quality.degeneration(loop).degenerate
    assert quality.degeneration("pickle pickle " * 20).degenerate  # distinct-2 far below 0.5
    bullets = ("* Step 1: take the wheel off\n* Step 2: find the hole\n* Step 3: patch the tube\n"
               "* Step 4: refit the tyre\n* Step 5: pump it up\n* Step 6: check for leaks")
    assert not quality.degeneration(bullets).degenerate
    prose = ("Leaves change colour in autumn because chlorophyll breaks down as days shorten, revealing yellow "
             "and orange pigments that were there all summer, while some trees make red anthocyanins.")
    d = quality.degeneration(prose)
    assert not d.degenerate and d.max_repeats == 1 and d.distinct2 == 1.0


def test_the_dev_set_is_forty_questions_of_its_own_format():
    ds = load_dataset(DEV_SET)
    assert ds.format == "sda-dev" and len(ds.items) == 40
    assert len({q for _, q in ds.items}) == 40
    readme_example = "How do I fix a flat bike tyre?"
    assert all(q != readme_example for _, q in ds.items)


pytest.importorskip("if_verifiable")


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
    capitals = ifeval.make_case("change_case:capital_word_frequency", "q", 3)  # needs a word tokenizer offline
    assert capitals.check("A few WORDS in CAPITALS.") in (True, False)
