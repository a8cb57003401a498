"""The quality metrics beside compliance (quality.py) and the IFEval instructions (ifeval.py). No model needed."""

from __future__ import annotations

import pytest

from sda_local.evaluation import quality
from sda_local.evaluation.datasets import DEV_SET, load_dataset


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


def test_quotes_do_not_hide_a_copy():
    instruction = "Answer with one of the following options: ('My answer is yes.', 'My answer is no.')"
    assert quality.echo("Answer with one of the following options.", instruction).echoed
    assert quality.echo("'Answer with one of' the following", instruction).echoed


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
    assert quality.degeneration("pickle pickle " * 20).degenerate  # a trigram repeated
    few_bigrams = "alpha beta gamma delta epsilon zeta eta theta " * 3  # each trigram 3 times, distinct-2 0.35
    d = quality.degeneration(few_bigrams)
    assert d.degenerate and d.max_repeats < quality.DEGENERATE_REPEATS and d.distinct2 < quality.DISTINCT2_MIN
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


def test_clean_compliance_needs_every_quality():
    from sda_local.evaluation.quality import CLEAN_FLUENCY, clean

    assert clean(True, False, False, CLEAN_FLUENCY)
    assert not clean(False, False, False, -1.0)  # did not comply
    assert not clean(True, True, False, -1.0)  # echoed the instruction
    assert not clean(True, False, True, -1.0)  # looped
    assert not clean(True, False, False, CLEAN_FLUENCY - 0.01)  # a keyword list, not text
    assert not clean(True, False, False, None)  # fluency not measured
