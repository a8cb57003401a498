"""Instructions a program can check: read an instruction's text, and check an answer against it.

``parse_checks(instruction)`` recognises the verifiable instructions people write ("Do not use any commas",
"Answer with less than 50 words", "End your answer with the exact phrase ...", IFEval's 25 instruction
types as the ``if-verifiable`` package phrases them, and common paraphrases). It returns the checks only
when they cover the whole instruction: "Be kind and do not use commas" is not verifiable (kindness is not
checked), so a judge must not treat it as if it were.

The checks are this project's own, written from the instructions' plain meaning and IFEval's published
definitions; they need nothing beyond the standard library (the language check uses ``langdetect`` where it
is installed, and is not recognised where it is not). The evaluation measures compliance with the
``if-verifiable`` package's checkers instead, and the tests measure how often the two agree.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

__all__ = ["Check", "parse_checks", "check_answer"]


@dataclass(frozen=True)
class Check:
    """One verifiable requirement: ``name`` (its kind), ``detail`` (what it asks, for people), and the test
    ``passes(answer, query)``."""

    name: str
    detail: str
    passes: Callable[[str, str], bool]


_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
            "nine": 9, "ten": 10}
_NUM = r"(\d+|one|two|three|four|five|six|seven|eight|nine|ten)"


def _number(text: str) -> int:
    text = text.strip().lower()
    return int(text) if text.isdigit() else _NUMBERS[text]


def _relation(text: str) -> Callable[[int, int], bool]:
    """A comparison of a count with a bound, from the words that say it."""
    text = " ".join(text.lower().split())
    if text in ("less than", "fewer than", "under", "below"):
        return lambda n, bound: n < bound
    if text in ("at most", "no more than", "not more than", "up to"):
        return lambda n, bound: n <= bound
    if text in ("at least", "no fewer than", "no less than", "a minimum of"):
        return lambda n, bound: n >= bound
    if text in ("more than", "over"):
        return lambda n, bound: n > bound
    return lambda n, bound: n == bound  # "exactly", or nothing


# A word the instruction names: quoted (its text: group 1) or bare (group 2); a closing quote is not part of it.
_WORD = r"(?:['\"‘“]([^'\"‘’“”]+)['\"’”]|([\w-]+))"
_REL = r"(less than|fewer than|under|below|at most|no more than|not more than|up to|at least|no fewer than|" \
       r"no less than|a minimum of|more than|over|exactly)?\s*"


def _words(text: str) -> List[str]:
    return re.findall(r"\w+", text)


def _sentences(text: str) -> List[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _keyword_list(text: str) -> List[str]:
    """['a', 'b'] or "a", "b" or a and b -> the words."""
    quoted = re.findall(r"['\"‘’“”]([^'\"‘’“”]+)['\"‘’“”]", text)
    if quoted:
        return [q.strip() for q in quoted if q.strip()]
    parts = re.split(r"\s*(?:,|\band\b|\bor\b)\s*", text.strip(" []()"))
    return [p.strip() for p in parts if p.strip()]


def _has_word(word: str, text: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE) is not None


def _count_word(word: str, text: str) -> int:
    # As IFEval counts: occurrences anywhere, inside other words too ("age" in "language").
    return len(re.findall(re.escape(word), text, flags=re.IGNORECASE))


def _bullets(text: str) -> int:
    # IFEval's count: "* item" lines (not "**bold**") and "- item" lines.
    return len(re.findall(r"^\s*\*[^*].*$", text, flags=re.MULTILINE)) + \
        len(re.findall(r"^\s*-.*$", text, flags=re.MULTILINE))


def _highlights(text: str) -> int:
    single = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("* ")]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h.strip("* ")]
    return len(single) + len(double)


def _is_json(text: str) -> bool:
    body = text.strip()
    body = re.sub(r"^```(?:json|Json|JSON)?\s*", "", body)
    body = re.sub(r"\s*```$", "", body).strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _paragraphs(text: str, separator: str) -> Optional[List[str]]:
    """The paragraphs between separators, or None where one is empty between two others."""
    parts = re.split(separator, text)
    stripped = [p.strip() for p in parts]
    inner = stripped[1:-1] if len(stripped) > 2 else []
    if any(not p for p in inner):
        return None
    return [p for p in stripped if p]


def _paragraph_count(text: str, n: int) -> bool:
    paragraphs = _paragraphs(text, r"\s?\*\*\*\s?")
    return paragraphs is not None and len(paragraphs) == n


def _nth_paragraph(text: str, n: int, nth: int, word: str) -> bool:
    paragraphs = _paragraphs(text, r"\n\n")
    if paragraphs is None or len(paragraphs) != n or nth > n:
        return False
    first = paragraphs[nth - 1].lstrip().split()
    if not first:
        return False
    return re.sub(r"[^\w]", "", first[0]).lower() == word.lower()


def _sections(text: str, splitter: str, n: int) -> bool:
    return len(re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", text)) - 1 >= n


def _two_responses(text: str) -> bool:
    parts = [p.strip() for p in text.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


_detector_lock = threading.Lock()
_detector_factory = None


def _detect(text: str) -> str:
    """langdetect's language of ``text``, from a private factory loaded once (langdetect's own global factory is
    published before its profiles are loaded, so threads detecting at once can see it empty), seeded."""
    global _detector_factory
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    with _detector_lock:
        if _detector_factory is None:
            factory = DetectorFactory()
            factory.load_profile(PROFILES_DIRECTORY)
            factory.set_seed(0)
            _detector_factory = factory
        detector = _detector_factory.create()
    detector.append(text)
    return detector.detect()


def _language(code_or_name: str) -> Optional[Callable[[str, str], bool]]:
    try:
        import langdetect
    except ImportError:
        return None
    name = code_or_name.lower()
    known = {c for v in _LANGUAGES.values() for c in (v if isinstance(v, tuple) else (v,))}
    value = _LANGUAGES.get(name, name if name in known else None)
    if value is None:
        return None
    codes = value if isinstance(value, tuple) else (value,)

    def passes(answer: str, query: str) -> bool:
        try:
            return _detect(answer) in codes
        except langdetect.LangDetectException:
            return True  # nothing to detect: IFEval counts it as followed

    return passes


_LANGUAGES = {"english": "en", "french": "fr", "german": "de", "spanish": "es", "italian": "it",
              "portuguese": "pt", "dutch": "nl", "finnish": "fi", "swedish": "sv", "russian": "ru",
              "japanese": "ja", "korean": "ko", "chinese": ("zh-cn", "zh-tw"), "arabic": "ar", "hindi": "hi",
              "bengali": "bn", "marathi": "mr", "tamil": "ta", "telugu": "te", "gujarati": "gu",
              "kannada": "kn", "punjabi": "pa", "urdu": "ur", "nepali": "ne", "persian": "fa",
              "thai": "th", "vietnamese": "vi", "turkish": "tr", "polish": "pl", "greek": "el",
              "bulgarian": "bg", "swahili": "sw", "hebrew": "he", "indonesian": "id", "ukrainian": "uk",
              "malayalam": "ml", "czech": "cs", "danish": "da", "norwegian": "no", "romanian": "ro",
              "hungarian": "hu", "croatian": "hr", "slovak": "sk", "slovenian": "sl", "estonian": "et",
              "latvian": "lv", "lithuanian": "lt", "macedonian": "mk", "albanian": "sq", "afrikaans": "af",
              "catalan": "ca", "welsh": "cy", "somali": "so", "tagalog": "tl"}


def _lowercase(answer: str, query: str) -> bool:
    return any(c.isalpha() for c in answer) and answer == answer.lower()


def _uppercase(answer: str, query: str) -> bool:
    return any(c.isalpha() for c in answer) and answer == answer.upper()


def _capital_words(answer: str) -> int:
    words = (w.strip(".,;:!?()[]{}\"'*") for w in answer.split())
    return sum(1 for w in words if w.isupper())


def _in_english(m: re.Match, check: Check) -> Optional[Check]:
    """``check``, and English where the instruction's first group asks for it too (None where no language
    detector is installed: then that part cannot be checked)."""
    if not m.group(1):
        return check
    english = _language("english")
    if english is None:
        return None
    return Check(check.name, check.detail + ", in English",
                 lambda a, q: check.passes(a, q) and english(a, q))


def _quoted(answer: str, query: str) -> bool:
    text = answer.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _ends_with(phrase: str) -> Callable[[str, str], bool]:
    return lambda answer, query: answer.strip().lower().endswith(phrase.strip().lower())


def _ends_with_loosely(phrase: str) -> Callable[[str, str], bool]:
    """A person's "end with the exact phrase X": a full stop after X, in the answer or the instruction, is not
    part of it."""
    wanted = phrase.strip().rstrip(".").strip().lower()
    return lambda answer, query: answer.strip().rstrip(".").rstrip().lower().endswith(wanted)


def _postscript(marker: str) -> Callable[[str, str], bool]:
    m = marker.strip().lower()
    # The rule captures P.S. or P.P.S only; IFEval's patterns for them.
    pattern = r"\s*p\.\s?p\.\s?s.*$" if m.startswith("p.p.s") else r"\s*p\.\s?s\..*$"
    return lambda answer, query: re.search(pattern, answer.lower(), flags=re.MULTILINE) is not None


# (pattern, builder): the builder gets the match and returns a Check, or None where the instruction is
# recognised but cannot be checked here (a language with no detector installed).
_Rule = Tuple[str, Callable[[re.Match], Optional[Check]]]
_ANSWER = r"(?:your (?:entire |whole )?(?:response|answer|reply|output)|the (?:response|answer|reply|output))"

_RULES: List[_Rule] = [
    # Commas.
    (r"(?:in " + _ANSWER + r",? )?(?:please )?(?:(?:answer|respond|reply|write(?: " + _ANSWER + r")?) )?(?:refrain from (?:the use of |using )?|do not use |don't use |"
     r"avoid (?:using )?|never use |use no |without (?:using )?)(?:any )?commas?(?: at all)?(?: in " + _ANSWER + r")?",
     lambda m: Check("no_comma", "no commas", lambda a, q: "," not in a)),
    (r"(?:there should be |use )?no commas(?: at all)?(?: in " + _ANSWER + r")?",
     lambda m: Check("no_comma", "no commas", lambda a, q: "," not in a)),
    (r"(?:in " + _ANSWER + r",? )?words with all capital letters should appear " + _REL + _NUM + r" times?",
     lambda m: Check("capital_words", f"{m.group(1) or 'exactly'} {m.group(2)} words in capitals",
                     lambda a, q, rel=_relation(m.group(1) or ""), n=_number(m.group(2)): rel(_capital_words(a), n))),
    # Letter case ("Your entire response should be in English, and in all lowercase letters.").
    (r"(" + _ANSWER + r" should be in english,? and )?(?:in )?all lowercase letters(?: only)?\.?"
     r"(?:\s*no capital letters are allowed)?",
     lambda m: _in_english(m, Check("lowercase", "all lowercase", _lowercase))),
    (r"(?:write |answer |respond )?(?:" + _ANSWER + r" )?(?:entirely |only )?in lowercase(?: letters)?(?: only)?",
     lambda m: Check("lowercase", "all lowercase", _lowercase)),
    (r"(" + _ANSWER + r" should be in english,? and )?(?:in )?all capital letters",
     lambda m: _in_english(m, Check("uppercase", "all capital letters", _uppercase))),
    (r"(?:write |answer |respond )?(?:" + _ANSWER + r" )?(?:entirely |only )?in (?:all caps|uppercase|capital letters)"
     r"(?: only)?", lambda m: Check("uppercase", "all capital letters", _uppercase)),
    # Quotation marks.
    (r"wrap " + _ANSWER + r" (?:with|in) double quotation marks",
     lambda m: Check("quotation", "wrapped in double quotes", _quoted)),
    # How it ends.
    (r"(?:finish|end) " + _ANSWER + r" with (?:this|the) exact (?:phrase|words?):? ['\"“]?(.+?)['\"”]?\.?"
     r"(?:\s*no other words should follow this phrase)",
     lambda m: Check("end_phrase", f"ends with {m.group(1)!r}", _ends_with(m.group(1)))),
    # A person's phrasing: the phrase quoted, or unquoted up to the end of its sentence.
    (r"(?:finish|end) " + _ANSWER + r" with (?:this|the) exact (?:phrase|words?):? (?:['\"“‘]([^'\"“”‘’]+)['\"”’]"
     r"|([^.!?'\"“”‘’]+[!?]?))(?=[\s.]|$)",
     lambda m: Check("end_phrase", f"ends with {(m.group(1) or m.group(2))!r}",
                     _ends_with_loosely(m.group(1) or m.group(2)))),
    (r"(?:at the end of " + _ANSWER + r",? )?(?:please )?(?:explicitly )?add a postscript(?: starting with| that starts "
     r"with| beginning with) (P\.P\.S\.?|P\.S\.?)",
     lambda m: Check("postscript", f"a postscript {m.group(1)}", _postscript(m.group(1)))),
    # Format.
    (r"" + _ANSWER + r" must contain a title,? wrapped in double angular brackets,? such as <<[^>]*>>",
     lambda m: Check("title", "a <<title>>", lambda a, q: re.search(r"<<[^\n]+>>", a) is not None)),
    (r"(?:the response|" + _ANSWER + r") must contain at least " + _NUM + r" placeholders? represented by square "
     r"brackets,? such as \[[^\]]*\]",
     lambda m: Check("placeholders", f"at least {m.group(1)} [placeholders]",
                     lambda a, q, n=_number(m.group(1)): len(re.findall(r"\[[^\]\n]*\]", a)) >= n)),
    (r"" + _ANSWER + r" must contain exactly " + _NUM + r" bullet points?\.?(?:\s*use the markdown bullet points "
     r"such as:?\s*\* this is point 1\.?\s*\* this is point 2\.?)?",
     lambda m: Check("bullets", f"exactly {m.group(1)} bullet points",
                     lambda a, q, n=_number(m.group(1)): _bullets(a) == n)),
    (r"(?:answer|respond) with a bullet list of exactly " + _NUM + r" items?(?:,? each starting with ['\"]?\*\s?['\"]?)?",
     lambda m: Check("bullets", f"exactly {m.group(1)} bullet points",
                     lambda a, q, n=_number(m.group(1)): _bullets(a) == n)),
    (r"answer with one of the following options:? \(?((?:['\"][^'\"]+['\"],?\s*)+)\)?",
     lambda m: Check("options", "one of the given options",
                     lambda a, q, options=tuple(_keyword_list(m.group(1))): any(o in a for o in options))),
    (r"highlight at least " + _NUM + r" sections? (?:in " + _ANSWER + r" )?with markdown,? i\.e\.? \*highlighted "
     r"section\*",
     lambda m: Check("highlights", f"at least {m.group(1)} *highlighted* sections",
                     lambda a, q, n=_number(m.group(1)): _highlights(a) >= n)),
    (r"" + _ANSWER + r" must have " + _NUM + r" sections?\.? mark the beginning of each section with (\w+) x,? such "
     r"as:?\s*\2 1\s*\[content of section 1\]\s*\2 2\s*\[content of section 2\]",
     lambda m: Check("sections", f"{m.group(1)} sections marked {m.group(2)} X",
                     lambda a, q, s=m.group(2), n=_number(m.group(1)): _sections(a, s, n))),
    (r"entire output should be wrapped in json format\.?(?:\s*you can use markdown ticks such as ```)?",
     lambda m: Check("json", "JSON", lambda a, q: _is_json(a))),
    (r"give two different responses\.? responses and only responses should be separated by 6 asterisk symbols:? "
     r"\*{6}",
     lambda m: Check("two_responses", "two responses separated by ******", lambda a, q: _two_responses(a))),
    (r"first repeat the request word for word without change,? then give your answer \(1\. do not say any words "
     r"or characters before repeating the request; 2\. the request you need to repeat does not include this "
     r"sentence\)",
     lambda m: Check("repeat_request", "repeats the request first",
                     lambda a, q: a.strip().lower().startswith(q.strip().lower()))),
    # Keywords.
    (r"(?:do not|don't|never) (?:include|use) (?:the )?(?:key)?words? (\[[^\]]*\]|['\"][^'\"]+['\"](?:,? (?:or |and )?"
     r"['\"][^'\"]+['\"])*) in " + _ANSWER,
     lambda m: Check("forbidden_words", f"none of {_keyword_list(m.group(1))}",
                     lambda a, q, ws=tuple(_keyword_list(m.group(1))): not any(_has_word(w, a) for w in ws))),
    (r"include (?:the )?(?:key)?words? (\[[^\]]*\]|['\"][^'\"]+['\"](?:,? (?:and )?['\"][^'\"]+['\"])*)"
     r"(?: somewhere)? in " + _ANSWER,
     lambda m: Check("keywords", f"all of {_keyword_list(m.group(1))}",
                     lambda a, q, ws=tuple(_keyword_list(m.group(1))): all(
                         re.search(re.escape(w), a, flags=re.IGNORECASE) for w in ws))),
    (r"(?:in " + _ANSWER + r",? )?the word " + _WORD + r" should appear " + _REL + _NUM + r" times?",
     lambda m: Check("word_frequency", f"{(m.group(1) or m.group(2))!r} {m.group(3) or 'exactly'} {m.group(4)} times",
                     lambda a, q, w=m.group(1) or m.group(2), rel=_relation(m.group(3) or ""), n=_number(m.group(4)):
                     rel(_count_word(w, a), n))),
    (r"(?:in " + _ANSWER + r",? )?the letter ['\"]?([a-z])['\"]? should appear " + _REL + _NUM + r" times?",
     lambda m: Check("letter_frequency", f"the letter {m.group(1)} {m.group(2) or 'exactly'} {m.group(3)} times",
                     lambda a, q, c=m.group(1).lower(), rel=_relation(m.group(2) or ""), n=_number(m.group(3)):
                     rel(a.lower().count(c), n))),
    # Language.
    (r"" + _ANSWER + r" should be in (\w+) language,? no other language is allowed",
     lambda m: (lambda test: Check("language", f"in {m.group(1)}", test) if test else None)(_language(m.group(1)))),
    # Length.
    (r"" + _ANSWER + r" should contain " + _REL + _NUM + r" sentences?",
     lambda m: Check("sentences", f"{m.group(1) or 'exactly'} {m.group(2)} sentences",
                     lambda a, q, rel=_relation(m.group(1) or ""), n=_number(m.group(2)): rel(len(_sentences(a)), n))),
    (r"(?:answer|respond|reply) (?:with|in) " + _REL + _NUM + r" words?",
     lambda m: Check("words", f"{m.group(1) or 'exactly'} {m.group(2)} words",
                     lambda a, q, rel=_relation(m.group(1) or ""), n=_number(m.group(2)): rel(len(_words(a)), n))),
    (r"(?:keep )?" + _ANSWER + r" (?:should be |must be )?" + _REL + _NUM + r" words?(?: long)?",
     lambda m: Check("words", f"{m.group(1) or 'exactly'} {m.group(2)} words",
                     lambda a, q, rel=_relation(m.group(1) or ""), n=_number(m.group(2)): rel(len(_words(a)), n))),
    (r"there should be " + _NUM + r" paragraphs?\.? paragraphs and only paragraphs are separated with each other "
     r"by two new lines as if it was '\\n\\n' in python\.? paragraph " + _NUM + r" must start with (?:the )?word "
     + _WORD,
     lambda m: Check("nth_paragraph", f"{m.group(1)} paragraphs, paragraph {m.group(2)} starting with "
                     f"{m.group(3) or m.group(4)}",
                     lambda a, q, n=_number(m.group(1)), k=_number(m.group(2)), w=m.group(3) or m.group(4):
                     _nth_paragraph(a, n, k, w))),
    (r"there should be " + _NUM + r" paragraphs?\.? paragraphs are separated with the markdown divider:? \*\*\*",
     lambda m: Check("paragraphs", f"{m.group(1)} paragraphs separated by ***",
                     lambda a, q, n=_number(m.group(1)): _paragraph_count(a, n))),
]
_COMPILED = [(re.compile(p, flags=re.IGNORECASE), build) for p, build in _RULES]
# What may remain of an instruction once its checks are taken out: joining words and punctuation.
_LEFTOVER = re.compile(r"^(?:[\s.,;:!()\-–—]|\band\b|\balso\b|\bplease\b|\bplus\b|\bthen\b)*$", flags=re.IGNORECASE)


# Longer instructions are not read (each rule rescans the text: the time grows with its square). IFEval's
# longest is under 400 characters.
MAX_INSTRUCTION_CHARS = 2000


def parse_checks(instruction: str) -> Optional[List[Check]]:
    """The checks of ``instruction``, or None when some of it is not a verifiable requirement recognised here
    (or nothing is)."""
    text = " ".join((instruction or "").split())
    if not text or len(text) > MAX_INSTRUCTION_CHARS:
        return None
    checks = _parse(text)
    return None if checks is None else list(checks)


@functools.lru_cache(maxsize=256)  # pure: an instruction is read once per process, however often it is judged
def _parse(text: str) -> Optional[Tuple[Check, ...]]:
    checks: List[Check] = []
    for pattern, build in _COMPILED:
        while True:
            m = pattern.search(text)
            if m is None or not m.group(0).strip():
                break
            check = build(m)
            if check is None:
                return None
            checks.append(check)
            text = text[:m.start()] + " . " + text[m.end():]
    if not checks or not _LEFTOVER.match(text):
        return None
    return tuple(checks)


def check_answer(checks: List[Check], answer: str, query: str = "") -> List[Tuple[Check, bool]]:
    """Each check with whether ``answer`` (to ``query``) passes it."""
    return [(c, bool(answer.strip()) and bool(c.passes(answer, query))) for c in checks]
