"""The instruction's parts (engine/instruction.py) and what the guarded steering does with them: the text read
into asked, forbidden and directive parts, the token ids for the real tokenizer, the native guards against the
numpy reference, and the onset."""

from __future__ import annotations

import numpy as np
import pytest

from sda_local.engine import native
from sda_local.engine.instruction import ASKED, DIRECTIVE, FORBIDDEN, instruction_guard, read, words
from sda_local.engine.steering import EchoTracker, Steering, fuse_steered_numpy
from sda_local.errors import InputError

from fusion_cases import copy_and_discouraged_rows, random_pair


def lib():
    handle = native.library()
    assert handle is not None, native.load_error()
    return handle


def test_negated_words_are_forbidden_and_quoted_text_is_asked():
    parts = words("Do not include keywords ['sun', 'moon'] in the response.")
    # The scope names what it forbids: those words; the rest of the clause is directive.
    assert parts["sun"] == parts["moon"] == FORBIDDEN
    assert parts["do"] == parts["not"] == parts["include"] == parts["response"] == DIRECTIVE
    parts = words("Include keywords ['sun', 'moon'] in the response.")
    assert parts["sun"] == parts["moon"] == ASKED and parts["include"] == DIRECTIVE
    # A negation inside quoted text is text, not a negation.
    parts = words("Answer with one of the following options: ('My answer is yes.', 'My answer is no.')")
    assert FORBIDDEN not in parts.values() and parts["yes"] == parts["no"] == ASKED
    # A word used outside the negation too is not forbidden: "other" belongs to the phrase asked for.
    parts = words("Finish your response with this exact phrase Any other questions?. No other words should follow "
                  "this phrase.")
    assert parts["other"] == parts["questions"] == ASKED and parts["follow"] == FORBIDDEN
    assert parts["finish"] == DIRECTIVE
    # Text the instruction names: a word, a letter, an abbreviation.
    parts = words("In your response, the word hit should appear 3 times and the letter q twice. End with P.P.S")
    assert parts["hit"] == parts["q"] == parts["p"] == parts["s"] == ASKED and parts["appear"] == DIRECTIVE
    # The scope ends with its clause.
    parts = words("Don't mention the price; keep it under 50 words.")
    assert parts["price"] == FORBIDDEN and parts["keep"] == parts["words"] == DIRECTIVE
    assert words("Never use commas.")["commas"] == FORBIDDEN
    assert words("Write without any adjectives.")["adjectives"] == FORBIDDEN
    # A bound is no negation.
    parts = words("Your response should contain no more than 3 paragraphs. Do not say goodbye.")
    assert parts["paragraphs"] == DIRECTIVE and parts["say"] == FORBIDDEN
    assert words("Do not use more than 3 commas.")["commas"] == DIRECTIVE


def test_symbols_are_asked_and_apostrophes_open_no_quote():
    text = "Highlight sections with markdown, i.e. *highlighted section*. Don't stop."
    parts = read(text)
    assert parts[text.index("*")] == ASKED and parts[text.index(",")] == ASKED
    assert parts[text.index("Highlight")] == DIRECTIVE
    assert parts[text.index("stop")] == FORBIDDEN


def test_the_guard_in_the_models_tokens(engine):
    model = engine.model

    def tokenize(text):
        return model.tokenize(text, add_bos=False, special=False)

    instruction = "Do not include keywords ['sun', 'moon'] in the response. Add a title, such as <<poem of joy>>."
    guard = instruction_guard(instruction, tokenize, model.piece, echo_run=2, read_parts=True, cap_directive=True)
    assert len(guard.sources) == 2 and len(guard.run_at) == len(guard.flat_tokens)
    for word in ("sun", "Sun", " sun", " moon"):
        assert tokenize(word)[0] in guard.forbidden
    for word in (" title", "Add", " add"):
        assert tokenize(word)[0] in guard.capped
    assert not set(guard.capped) & set(guard.forbidden)
    # Function words and pieces shorter than a word's first 3 letters are neither capped nor forbidden...
    for text in (" the", "the", " in", "S", " S", "W"):
        assert tokenize(text)[0] not in guard.capped + guard.forbidden, text
    # ... unless the instruction names them.
    named = instruction_guard("Do not include keywords ['and', 'the'] in the response.", tokenize, model.piece,
                              echo_run=2, read_parts=True, cap_directive=True)
    assert tokenize(" the")[0] in named.forbidden and tokenize(" and")[0] in named.forbidden
    assert tokenize(" response")[0] in named.capped
    # The asked title is free to copy: none of its tokens in the first source is guarded; the directive's are.
    flat, run_at = guard.flat_tokens, guard.run_at
    first = list(guard.sources[0])
    title = tokenize("poem of joy")
    start = next(i for i in range(len(first)) if first[i:i + 2] == title[:2] or first[i] == tokenize(" poem")[0])
    assert run_at[start] == 0
    assert run_at[first.index(tokenize(" title")[0])] == 2
    assert [run_at[i] for i, t in enumerate(flat) if t == -1] == [0, 0]
    # Without parts: the echo guard alone, as before.
    plain = instruction_guard(instruction, tokenize, model.piece, echo_run=2, read_parts=False, cap_directive=False)
    assert plain.sources == guard.sources and set(plain.run_at) == {0, 2} and not plain.capped and not plain.forbidden
    assert [r for r, t in zip(plain.run_at, plain.flat_tokens) if t >= 0] == [2] * (len(plain.flat_tokens) - 2)


def test_run_at_decides_which_positions_are_guarded():
    tracker = EchoTracker([(5, 6, 7, 8)], run=2, run_at=[2, 2, 0, 1, 0])
    assert sorted(tracker.guarded().tolist()) == [8]  # run_at 1: guarded whatever came before
    tracker.accept(5)
    assert sorted(tracker.guarded().tolist()) == [6, 8]
    tracker.accept(6)
    assert tracker.guarded().tolist() == [8]  # 7 is never guarded
    with pytest.raises(ValueError):
        EchoTracker([(5, 6)], run=2, run_at=[2, 2])  # one per token and separator


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("guard_to", ["without", "prompt"])
def test_native_guards_match_numpy(strength, guard_to):
    rng = np.random.default_rng(int(strength * 10) + len(guard_to))
    z_with, z_without = random_pair(rng, 49152)
    z_with[::97] = -np.inf
    z_without[::89] = -np.inf
    guarded, capped, forbidden = rng.integers(0, 49152, 9), rng.integers(0, 49152, 40), rng.integers(0, 49152, 30)
    forbidden = np.concatenate([forbidden, [0, 97, 89]])  # masked in either row
    for steering in (Steering("guarded", echo_run=2, guard_to=guard_to, parts=True, cap=True),
                     Steering("guarded", clip=1.0, echo_run=2, guard_to=guard_to, parts=True)):
        for mode, code in (("paper", 0), ("fixed", 2)):
            a = native.fuse_steered(lib(), z_with, z_without, strength, 2.0, 0.6, code, steering, guarded,
                                    capped=capped, forbidden=forbidden)
            b = fuse_steered_numpy(z_with, z_without, strength, steering, guarded, k=2.0, t0=0.6,
                                   temperature_mode=mode, capped=capped, forbidden=forbidden)
            assert np.array_equal(np.isfinite(a[0]), np.isfinite(b[0]))
            finite = np.isfinite(b[0])
            assert np.abs(np.exp(a[0][finite]) - np.exp(b[0][finite])).max() < 1e-5
            assert abs(a[1] - b[1]) < 1e-5 and abs(a[2] - b[2]) < 1e-5


def test_capped_and_forbidden_values():
    # Token 3: the copy (likely with, unlikely without); token 4: discouraged by the instruction; token 5: neutral.
    z_with, z_without = copy_and_discouraged_rows()
    common = dict(k=2.0, t0=1.0, temperature_mode="fixed")
    steering = Steering("guarded", echo_run=2, parts=True, cap=True)
    free = fuse_steered_numpy(z_with, z_without, 1.0, steering, None, **common)[0]
    capped = fuse_steered_numpy(z_with, z_without, 1.0, steering, None, capped=[3, 4], **common)[0]
    forbidden = fuse_steered_numpy(z_with, z_without, 1.0, steering, None, forbidden=[3, 4], **common)[0]
    lp = z_with - np.log(np.exp(z_with).sum())
    lq = z_without - np.log(np.exp(z_without).sum())
    steered0 = lp[0] + 2.0 * (lp[0] - lq[0])  # an unguarded token's steered logit
    assert capped[3] - capped[0] == pytest.approx(lp[3] - steered0, abs=1e-4)  # no more than prompting
    assert capped[4] - capped[0] == pytest.approx(free[4] - free[0], abs=1e-4)  # already below it
    assert forbidden[3] - forbidden[0] == pytest.approx(lq[3] - steered0, abs=1e-4)  # min(l_with, l_without)
    assert forbidden[4] - forbidden[0] == pytest.approx(free[4] - free[0], abs=1e-4)  # its suppression stays
    assert free[3] > capped[3] > forbidden[3]


def test_steering_fields_are_checked():
    for bad in (Steering("guarded", cap=True), Steering("guarded", onset=-1), Steering("guarded", parts=1),
                Steering("paper", parts=True), Steering("paper", onset=3)):
        with pytest.raises(InputError):
            bad.check()
    assert Steering("guarded", parts=True, cap=True, onset=8).check().reads_instruction


ARMS = [Steering("guarded", echo_run=2, parts=True, cap=True, onset=5),
        Steering("guarded", echo_run=2, guard_to="prompt", parts=True)]


@pytest.mark.parametrize("steering", ARMS, ids=["cap-onset", "prompt-parts"])
def test_native_sampler_follows_the_numpy_reference(engine, steering):
    # The same generation with the native sampler and the numpy reference, token for token: the guards' ids and
    # runs, the onset's count and the fusion agree.
    from sda_local import SDAEngine

    query = "How do bees make honey?"
    instruction = "Do not include keywords ['flower', 'sweet'] in the response. Add a title such as <<bee joy>>."
    native_result = engine.generate(query, instruction, strength=1.0, steering=steering, seed=5, max_tokens=40)
    assert native_result.stats.fusion_backend == "native"
    with SDAEngine(str(engine.model_path), n_ctx=1024, n_threads=2, fusion_backend="numpy") as numpy_engine:
        numpy_result = numpy_engine.generate(query, instruction, strength=1.0, steering=steering, seed=5,
                                             max_tokens=40)
    assert numpy_result.stats.fusion_backend == "numpy"
    assert native_result.tokens == numpy_result.tokens


def test_the_onset_starts_as_prompting(engine):
    # Before the onset the answer is prompting's, token for token; after it the steering changes the answer.
    query = "Why is the sky blue?"
    instruction = "Your entire response should be in English, and in all lowercase letters."
    base = Steering("guarded", echo_run=2, parts=True, cap=True)
    prompting = engine.generate(query, instruction, strength=0.0, steering=base, seed=3, max_tokens=48,
                                temperature_mode="fixed")
    late = engine.generate(query, instruction, strength=1.0, steering=Steering(**{**base.to_dict(), "onset": 6}),
                           seed=3, max_tokens=48, temperature_mode="fixed")
    at_once = engine.generate(query, instruction, strength=1.0, steering=base, seed=3, max_tokens=48,
                              temperature_mode="fixed")
    assert late.tokens[:6] == prompting.tokens[:6]
    assert late.tokens != prompting.tokens
    assert at_once.tokens[:6] != prompting.tokens[:6]
