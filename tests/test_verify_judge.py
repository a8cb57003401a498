"""The verify judge (issue 20): instructions a program can check, read from their text; the prompted first
answer checked against them; a = 0 where prompting already complies (the answer is then prompting's, token for
token), the steering's a where it does not; the self judge for everything else (``--judge auto``, the default).
On the real default model where a model is involved."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from sda_local.errors import InputError
from sda_local.evaluation.verifiable import VERIFIABLE
from sda_local.judging import AutoJudge, JudgeError, VerifyJudge, first_answer_mode, make_judge
from sda_local.judging.checks import check_answer, parse_checks
from sda_local.judging.selfscore import SelfJudge
from sda_local.judging.verifier import A_MAX, FIRST_OBSERVED, FIRST_PROMPTED, FIRST_WITHOUT
from sda_local.pipeline import align
from sda_local.prompts import resolve_alignment
from sda_local.rubrics import rubric_for

QUERY = "Why is the sky blue?"
# Answers of many shapes, to compare this project's checks with IFEval's on every case of the development set.
ANSWERS = [
    "The sky is blue because of Rayleigh scattering, which scatters short wavelengths more.",
    "the sky is blue because air scatters blue light more than red light.",
    "THE SKY IS BLUE BECAUSE OF SCATTERING.",
    '"The sky is blue because of scattering."',
    "<<Why the Sky Is Blue>>\nSunlight scatters off air molecules. Blue scatters most. Is there anything else I "
    "can help with?",
    "Here is my answer.\n* point one\n* point two\n* point three\n* point four\nP.S. thanks",
    "- one\n- two\n**bold** text",
    "My answer is yes.",
    "SECTION 1\nBlue light.\nSECTION 2\nScattering.\nSECTION 3\nDone.",
    "Section 1 light Section 2 air",
    '```json\n{"answer": "scattering"}\n```',
    '{"answer": ',
    "Blue.\n******\nScattering makes it blue.",
    "Same.\n******\nSame.",
    "Para one here.\n\nPara two here.\n\nPara three.",
    "Para one.\n\n\n\nPara two.",
    "First part.\n***\nSecond part.\n***\nThird.",
    "Use [name] at [address] and [date]. *highlighted one* and *two* and **three**",
    "Any other questions?",
    "P.P.S more",
    "Ok. Sure! Yes? No. Maybe. Fine.",
    "Le ciel est bleu à cause de la diffusion de la lumière par les molécules de l'air.",
    "O céu é azul porque a luz azul é espalhada pelas moléculas do ar em todas as direções.",
    "image president chocolate news dance language prize prize island painting painting tool window",
]


def dev_questions():
    from sda_local.evaluation.datasets import DEV_SET, load_dataset

    return [q for _, q in load_dataset(DEV_SET).items]


def test_every_ifeval_type_is_read_from_its_text_and_checked_as_ifeval_checks_it():
    ifeval = pytest.importorskip("sda_local.evaluation.ifeval")
    pytest.importorskip("if_verifiable")
    compared = disagreements = 0
    seen = set()
    for type_id in ifeval.TYPES:
        for index, question in enumerate(dev_questions()):
            case = ifeval.make_case(type_id, question, index)
            checks = parse_checks(case.instruction)
            assert checks is not None and len(checks) == 1, case.instruction
            seen.add(checks[0].name)
            for answer in ANSWERS + [question + " " + ANSWERS[0], question]:
                compared += 1
                mine = all(ok for _, ok in check_answer(checks, answer, question))
                disagreements += mine != case.check(answer)
    assert len(seen) == 25 and compared == 25 * 40 * (len(ANSWERS) + 2)
    assert disagreements == 0


@pytest.mark.parametrize("vid", sorted(VERIFIABLE))
def test_this_projects_seven_instructions_are_read_and_checked_alike(vid):
    v = VERIFIABLE[vid]
    checks = parse_checks(v.instruction)
    assert checks is not None, v.instruction
    for answer in ANSWERS + ["I like banana bread. Hope this helps!", "* a\n* b\n* c"]:
        assert all(ok for _, ok in check_answer(checks, answer)) == v.check(answer), (vid, answer)


@pytest.mark.parametrize("instruction, names", [
    ("Answer without commas.", ["no_comma"]),
    ("Do not use commas and answer in lowercase.", ["no_comma", "lowercase"]),
    ("Respond in all caps.", ["uppercase"]),
    ("Answer with at most 50 words.", ["words"]),
    ("Your answer should be less than 3 sentences.", None),  # "should be ... sentences" is not a phrasing known here
    ("Your response should contain at most 3 sentences.", ["sentences"]),
    ("Do not include the words 'cat' or 'dog' in your answer.", ["forbidden_words"]),
    ("helpfulness", None),
    ("Be kind and do not use any commas.", None),  # kindness is not checked: not verifiable in full
    ("Explain it like I am five.", None),
    ("", None),
])
def test_instructions_are_verifiable_only_when_checked_in_full(instruction, names):
    checks = parse_checks(instruction)
    assert (None if checks is None else [c.name for c in checks]) == names


def test_checks_on_answers():
    (lower,) = parse_checks("Write your entire answer in lowercase letters only.")
    assert lower.passes("all small here.", "") and not lower.passes("Not small.", "") and not lower.passes("123", "")
    (words,) = parse_checks("Answer with less than 5 words.")
    assert words.passes("One two three four.", "") and not words.passes("One two three four five.", "")
    (repeat,) = parse_checks(
        "First repeat the request word for word without change, then give your answer (1. do not say any words or "
        "characters before repeating the request; 2. the request you need to repeat does not include this sentence)")
    assert repeat.passes(QUERY + " Because of scattering.", QUERY) and not repeat.passes("Because.", QUERY)
    (forbidden,) = parse_checks("Do not include keywords ['sun', 'light'] in the response.")
    assert forbidden.passes("Sunny skies.", "") and not forbidden.passes("The Sun is bright.", "")
    # An empty answer meets nothing (IFEval's strict check).
    assert check_answer([forbidden], "  ") == [(forbidden, False)]


def test_the_verify_judge_sets_a_from_the_check():
    judge = VerifyJudge()
    rubric = rubric_for(resolve_alignment("Do not use any commas in your answer."))
    met = judge.score(QUERY, "Light scatters in the air.", rubric)
    missed = judge.score(QUERY, "Light, in the air, scatters.", rubric)
    assert (met.score, met.amplifier, missed.score, missed.amplifier) == (100.0, 0.0, 0.0, A_MAX) and A_MAX == 1.0
    assert met.scoring == "verify" and met.rubric_version == "verify-v1" and "missed" in missed.raw
    two = rubric_for(resolve_alignment("Do not use commas and answer in lowercase."))
    half = judge.score(QUERY, "Light scatters in the air.", two)
    assert half.score == 50.0 and half.amplifier == A_MAX
    with pytest.raises(JudgeError, match="not one a program can check"):
        judge.score(QUERY, "Anything.", rubric_for(resolve_alignment("helpfulness")))
    with pytest.raises(JudgeError, match="cannot compare two"):
        judge.score_pair(QUERY, "a", "b", rubric)


def test_each_judge_reads_its_own_first_answer(engine):
    commas, kind = resolve_alignment("Answer without commas."), resolve_alignment("helpfulness")
    auto = make_judge(None, engine)
    assert isinstance(auto, AutoJudge)
    assert first_answer_mode(auto, commas) == FIRST_PROMPTED and first_answer_mode(auto, kind) == FIRST_OBSERVED
    assert first_answer_mode(VerifyJudge(), commas) == FIRST_PROMPTED
    with pytest.raises(InputError, match="not one a program can check"):
        first_answer_mode(VerifyJudge(), kind)
    assert first_answer_mode(SelfJudge(engine), commas) == FIRST_OBSERVED
    assert first_answer_mode(make_judge("local", engine), commas) == FIRST_WITHOUT
    with pytest.raises(InputError, match="unknown judge"):
        make_judge("verify:x", engine)


def test_a_complying_prompted_answer_is_the_answer_and_a_missed_one_is_steered(engine, rows_batch_invariant):
    query = "Name three fruits."
    # No answer of 12 tokens has 300 words: prompting misses it, and the steering's a is set.
    missed = align(engine, query, "Answer with at least 300 words.", max_tokens=12, seed=5)
    prompted = engine.generate(query, "Answer with at least 300 words.", strength=0.0, temperature_mode="fixed",
                               seed=5, max_tokens=12)
    assert missed.judge == "verify" and missed.amplifier == A_MAX and missed.score == 0.0
    if rows_batch_invariant:  # one plain row against the two rows of a = 0 (conftest probes the kernels)
        assert missed.initial_text == prompted.text  # the first answer is prompting's, same seed
    assert missed.stats.mode == "sda" and missed.stats.strength == A_MAX
    # It missed: the steered answer has no onset (its first tokens would replay those of the answer that missed).
    assert missed.stats.steering["onset"] == 0 and engine.request("x", "y").steering.onset > 0
    # A word the model has no reason to write: prompting complies, a = 0, and the answer is prompting's.
    met = align(engine, query, "Do not include keywords ['xylophone'] in the response.", max_tokens=12, seed=5)
    assert met.judge == "verify" and met.amplifier == 0.0 and met.score == 100.0
    assert met.stats.strength == 0.0 and met.stats.temperature_mode == "fixed"
    if rows_batch_invariant:  # one row against two in a ubatch: equal where the kernels are (conftest probes it)
        assert met.text == met.initial_text
    # The steered answer took the slot the prompted first answer held: its with-prompt was cached.
    assert met.stats.prefill_tokens_with < met.stats.prompt_tokens_with


def test_cli_judge_verify_and_eval_with_the_default_judge(tmp_path, model_path):
    pytest.importorskip("if_verifiable")
    proc = run_cli("judge", QUERY, "Light, in the air, scatters.", "--align", "Answer without commas.", "--judge",
                   "verify", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    verdict = json.loads(proc.stdout)
    assert verdict["judge"] == "verify" and verdict["amplifier"] == A_MAX and verdict["amplifier_map"] is None
    proc = run_cli("judge", QUERY, "Fine.", "--align", "Be kind.", "--judge", "verify", timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "not one a program can check" in err and "Traceback" not in err

    # eval's pipeline arm with the default judge: the initial answer of a checkable instruction is the
    # prompt-only arm's; a = 0 exactly where this project's check passes it, and then the sda arm repeats it.
    run = tmp_path / "run.jsonl"
    proc = run_cli("eval", "-d", "dev", "--verify", "ifeval:punctuation:no_comma,ifeval:keywords:forbidden_words",
                   "--verify-limit", "3", "--verify-strength", "judge", "--verify-only", "--arms", "prompt-only",
                   "-n", "16", "--no-fluency", "--run", str(run), "--threads", "1", timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    records = [json.loads(line) for line in run.read_text().splitlines()[1:]]
    scores = {r["key"]: r for r in records if r["type"] == "score"}
    answers = {(r["key"], r["arm"]): r for r in records if r["type"] == "answer"}
    checks = {(r["key"], r["arm"]): r for r in records if r["type"] == "check"}
    assert len(scores) == 6 and not any(arm == "base" for _, arm in answers)
    zeros = 0
    for key, score in scores.items():
        prompted = answers[(key, "prompt-only")]["text"]
        instruction = checks[(key, "sda")]["instruction_text"]
        met = all(ok for _, ok in check_answer(parse_checks(instruction), prompted))
        assert score["judge"] == "verify" and score["amplifier"] == (0.0 if met else A_MAX)
        assert answers[(key, "sda")]["stats"]["strength"] == score["amplifier"]
        steered = answers[(key, "sda")]["stats"]
        zeros += score["amplifier"] == 0
        if met:
            assert steered["temperature_mode"] == "fixed"
        else:
            assert steered["steering"]["onset"] == 0
    amplifiers = json.loads(run.with_suffix(".summary.json").read_text())["verifiable_amplifiers"]
    assert {vid: cell["n"] for vid, cell in amplifiers.items()} == {
        "ifeval:punctuation:no_comma": 3, "ifeval:keywords:forbidden_words": 3}
    assert sum(cell["zero"] for cell in amplifiers.values()) == zeros


@pytest.mark.parametrize("instruction, phrase", [
    ("End your answer with the exact phrase 'Thank you'.", "Thank you"),
    ('End your answer with the exact phrase "Thank you".', "Thank you"),
    ("End your answer with the exact words: Hope this helps!", "Hope this helps!"),
    ("End your answer with the exact phrase See you soon.", "See you soon"),
])
def test_an_end_phrase_is_read_without_what_follows_it(instruction, phrase):
    (check,) = parse_checks(instruction)
    assert check.detail == f"ends with {phrase!r}"
    assert check.passes(f"Well. {phrase}", "") and not check.passes(f"{phrase} and more", "")
    # What follows a quoted phrase is part of the instruction, not of the phrase: checked, or not verifiable at
    # all. (An unquoted phrase runs to the end of its sentence: nothing says where it stops.)
    if "'" in instruction or '"' in instruction:
        assert parse_checks(instruction.rstrip(".") + ", then explain why.") is None
    both = parse_checks("End your answer with the exact phrase 'Bye'. Do not use commas.")
    assert sorted(c.detail for c in both) == ["ends with 'Bye'", "no commas"]


def test_a_quoted_word_is_counted_without_its_quotes():
    (twice,) = parse_checks("In your response, the word 'banana' should appear at least 2 times.")
    assert twice.passes("A banana and a banana.", "") and not twice.passes("One banana.", "")
    (never,) = parse_checks("In your response, the word 'cat' should appear less than 1 times.")
    assert never.passes("A dog.", "") and not never.passes("A cat.", "")


def test_long_instructions_are_not_read():
    # Each rule rescans the text, so reading grows with its square (152k characters took 19 s): a cap.
    from sda_local.judging.checks import MAX_INSTRUCTION_CHARS

    read = "Do not use any commas. " * (MAX_INSTRUCTION_CHARS // 30)  # checkable in full, and under the cap
    assert parse_checks(read) is not None
    assert parse_checks(read * 2) is None  # the same sentences beyond the cap


def test_language_checks_are_right_from_many_threads_at_once():
    pytest.importorskip("langdetect")
    from concurrent.futures import ThreadPoolExecutor

    import sda_local.judging.checks as checks

    checks._detector_factory = None  # as in a fresh process: threads race to load the profiles
    (french,) = parse_checks("Your ENTIRE response should be in French language, no other language is allowed.")
    english = "The sky is blue because the air scatters the short wavelengths of sunlight the most."
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: french.passes(english, ""), range(16))) == [False] * 16
    assert french.passes("Le ciel est bleu parce que l'air diffuse davantage la lumière bleue du soleil.", "")


def test_the_verify_judge_refuses_an_instruction_it_cannot_check_before_generating(engine):
    with pytest.raises(InputError, match="not one a program can check"):
        align(engine, "Name three fruits.", "Be kind.", judge="verify", max_tokens=4)
