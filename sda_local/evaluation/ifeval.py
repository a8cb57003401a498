"""IFEval instructions: every single-answer instruction type that the ``if-verifiable`` package checks (25), as
verifiable SDA instructions. The package (Google's IFEval checkers, Apache-2.0) writes the instruction text
from its arguments (a keyword, a number, a phrase) and checks an answer against it, strictly.

A case is one instruction type with arguments drawn for one (question, seed): the package draws them with
Python's ``random``, which is seeded here per case and restored afterwards, so a case is the same on every
run and machine (for the pinned package version). The arguments are recorded with each check.

Two things the package needs are not installable offline, and are replaced here:
* NLTK's trained Punkt model (``number_sentences``, ``capital_word_frequency``): NLTK's untrained PunktSentenceTokenizer, which splits at
  sentence punctuation followed by a space, is used when the model is missing;
* langdetect is seeded (``DetectorFactory.seed = 0``), so ``response_language`` is deterministic.

``pip install 'sda-local[eval]'`` brings the package (Python >= 3.11).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import InputError

PREFIX = "ifeval:"
# The 25 types of if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT (0.1.2), in its order. The
# registry's disabled types (key sentences, rephrasing, multi-turn) have no checker and are not here.
TYPES: Tuple[str, ...] = (
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
    "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders", "detectable_content:postscript",
    "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
    "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
    "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
    "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma",
    "startend:quotation",
)

# Arguments whose value the answer is asked to write out: text the echo metric does not count as echo.
REQUIRED_TEXT_ARGS = ("keywords", "keyword", "end_phrase", "postscript_marker", "first_word", "section_spliter",
                      "prompt_to_repeat")

# The answers detectable_format:constrained_response offers (the package's fixed options).
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

_registry = None
_random_lock = threading.Lock()  # make_case seeds the global random module the package draws from


def _load():
    global _registry
    if _registry is None:
        try:
            import langdetect
            import nltk
            from if_verifiable.ifeval import instructions_util
            from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
        except ImportError as exc:
            raise InputError(f"the IFEval instructions need the if-verifiable package ({exc.name} is missing): "
                             "pip install 'sda-local[eval]' (Python >= 3.11)") from None
        langdetect.DetectorFactory.seed = 0
        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
        except LookupError:  # sentence counts and nltk.word_tokenize (capital_word_frequency) both need it
            tokenizer = nltk.tokenize.punkt.PunktSentenceTokenizer()
            instructions_util._get_sentence_tokenizer = lambda: tokenizer
            nltk.tokenize._get_punkt_tokenizer = lambda language="english": tokenizer
        missing = [t for t in TYPES if t not in INSTRUCTION_DICT]
        if missing:
            raise InputError(f"this if-verifiable version lacks the IFEval types {', '.join(missing)}")
        _registry = INSTRUCTION_DICT
    return _registry


def is_ifeval(vid: str) -> bool:
    return vid.startswith(PREFIX) and vid[len(PREFIX):] in TYPES


def all_ids() -> List[str]:
    return [PREFIX + t for t in TYPES]


@dataclass(frozen=True)
class Case:
    """One IFEval instruction with its arguments; ``instruction`` is the text given to the model."""

    type: str
    instruction: str
    kwargs: Dict[str, object] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return PREFIX + self.type

    def required_texts(self) -> List[str]:
        """The arguments the answer is asked to write out (a keyword, the end phrase, ...)."""
        out: List[str] = list(CONSTRAINED_OPTIONS) if self.type == "detectable_format:constrained_response" else []
        for name in REQUIRED_TEXT_ARGS:
            value = self.kwargs.get(name)
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, (list, tuple)):
                out.extend(str(v) for v in value)
        return out

    def check(self, answer: str) -> bool:
        """IFEval's strict check of ``answer``."""
        checker = _load()[self.type](self.type)
        checker.build_description(**self.kwargs)
        return bool(answer.strip()) and bool(checker.check_following(answer))


def make_case(type_id: str, query: str, seed: int) -> Case:
    """The case of one IFEval type for one question and seed (arguments drawn by the package, seeded)."""
    if type_id.startswith(PREFIX):
        type_id = type_id[len(PREFIX):]
    if type_id not in TYPES:
        raise InputError(f"unknown IFEval instruction type {type_id!r}")
    checker = _load()[type_id](type_id)
    with _random_lock:
        return _draw(checker, type_id, query, seed)


def _draw(checker, type_id: str, query: str, seed: int) -> Case:
    state = random.getstate()
    try:
        random.seed(f"{type_id}:{seed}")
        if type_id == "combination:repeat_prompt":
            text = checker.build_description(prompt_to_repeat=query)
        else:
            text = checker.build_description()
        kwargs = {k: v for k, v in (checker.get_instruction_args() or {}).items() if v is not None}
    finally:
        random.setstate(state)
    return Case(type_id, text.strip(), kwargs)


def case_from_record(type_id: str, instruction: str, kwargs: Optional[dict]) -> Case:
    return Case(type_id[len(PREFIX):] if type_id.startswith(PREFIX) else type_id, instruction, dict(kwargs or {}))
