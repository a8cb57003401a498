"""What each part of an instruction is for, read from its text, and what the steering does with it.

The contrast l_with - l_without is largest for the instruction's own words (the with-prompt makes them likely by
copying), so the paper's steering drifts into talking *about* the instruction. The words of an instruction play
different parts, and the guarded steering treats them differently:

* **asked** text, which the answer is asked to write out: a quoted span ('...', "...", <<...>>, `...`, «...»),
  an abbreviation ("P.P.S", "e.g."), the word named after "the word", "letter", "keyword" or "term", the text
  after "phrase" to the end of its sentence, and runs of symbols ("*", "[address]"'s brackets, "******").
  Steered freely, copied freely.
* **forbidden** words, in the scope of a negation ("Do not include keywords ['sun'] ...", "avoid", "never",
  "refrain from", "no", "without", up to the end of the clause): a forbidden word gets at most
  min(l_with, l_without) - the copy the with-prompt makes is never rewarded, whatever the contrast says.
* the **directive**, the rest ("Include keywords", "in your response"): its words are never amplified beyond
  prompting (min(l, l_with)), and a run of it (the echo guard) falls to l_without.

The negation cues are English: in another language every word is directive (the guard still applies).
``read`` gives each character's part; ``instruction_guard`` turns the parts into token ids and per-position run
thresholds for a tokenizer (the native sampler's ``sda_instruction`` and the numpy reference's ``EchoTracker``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

ASKED, FORBIDDEN, DIRECTIVE = "asked", "forbidden", "directive"

# A quoted span, without line breaks inside (an apostrophe in "don't" opens nothing: the quote must start a word).
_QUOTED = re.compile(r"(?<![A-Za-z0-9])'[^'\n]+'(?![A-Za-z0-9])|\"[^\"\n]+\"|<<[^>\n]+>>|`[^`\n]+`|«[^»\n]+»|“[^”\n]+”")
_NEGATION = re.compile(r"\b(?:do not|does not|did not|don't|doesn't|never|not|no|avoid|avoiding|without|"
                       r"refrain from|exclude|excluding|nor)\b"
                       # "no more than 3 paragraphs", "not less than": a bound, not a negation
                       r"(?!\s+(?:more|less|fewer|longer|shorter|later|earlier)\s+than\b)", re.IGNORECASE)
_BOUND = re.compile(r"\b(?:more|less|fewer|longer|shorter)\s+than\b|\bat\s+(?:most|least)\b", re.IGNORECASE)
# A negation's scope ends with its clause: a sentence end, a semicolon or a line break.
_CLAUSE_END = re.compile(r"[.;!?](?=\s|$)|\n")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_SYMBOLS = re.compile(r"[^\w\s]+|_+")
_ABBREVIATION = re.compile(r"(?<![\w.])(?:[A-Za-z]\.)+[A-Za-z]?\.?(?![\w])")
# Text an instruction names: "the word hit", "the letter i", "start with word request", "the exact phrase Any
# other questions?." (to the end of its sentence).
_NAMED_WORD = re.compile(r"\b(?:word|letter|keyword|term)\s+([^\W_]+)", re.IGNORECASE)
_NAMED_PHRASE = re.compile(r"\bphrase\s*:?\s+(.+?)(?=[.;!](?:\s|$)|\n|$)", re.IGNORECASE)
# Words shorter than this are neither capped nor forbidden: "a", "of", "is" carry no instruction, and a capped
# "P" would hold back "P.S." too.
MIN_GUARDED_WORD = 3
# Function words are neither capped nor forbidden unless the instruction names them ("Do not include keywords
# ['and', 'the']"): holding back " the" or " any" at every step says nothing about the instruction.
STOPWORDS = frozenset("""
    about above after again all also and any are because been before being below both but can could did does
    doing each few for from further had has have having her here hers him his how into its itself just may
    might more most must nor not off once only other our ours out over own same she should some such than that
    the their them then there these they this those through too under until use used uses using very was were
    what when where which while who whom why will with would you your yours
""".split())


def read(instruction: str) -> List[str]:
    """Each character's part: ASKED, FORBIDDEN or DIRECTIVE (in a negation's scope, FORBIDDEN wins over ASKED:
    "do not write 'x'"). A negation whose scope is a bound ("Do not use more than 3 commas") forbids nothing."""
    parts = [DIRECTIVE] * len(instruction)
    for m in _QUOTED.finditer(instruction):
        parts[m.start():m.end()] = [ASKED] * (m.end() - m.start())
    for pattern in (_ABBREVIATION, _NAMED_WORD, _NAMED_PHRASE):
        for m in pattern.finditer(instruction):
            start, end = m.span(m.lastindex or 0)
            parts[start:end] = [ASKED] * (end - start)
    for m in _SYMBOLS.finditer(instruction):
        for i in range(m.start(), m.end()):
            if parts[i] == DIRECTIVE:
                parts[i] = ASKED
    for m in _NEGATION.finditer(instruction):
        if parts[m.start()] == ASKED:  # "My answer is no." quoted is no negation
            continue
        end = _CLAUSE_END.search(instruction, m.end())
        stop = end.start() if end else len(instruction)
        if _BOUND.search(instruction, m.end(), stop):
            continue
        scope = [i for i in range(m.end(), stop) if instruction[i].isalnum()]  # its words, not quotes nor brackets
        # Where the scope names what it forbids ("Do not include keywords ['sun']"), that is what is forbidden and
        # the rest is directive; else every word in scope is ("Do not use any commas").
        named = [i for i in scope if parts[i] == ASKED]
        for i in named or scope:
            parts[i] = FORBIDDEN
    return parts


def words(instruction: str) -> Dict[str, str]:
    """Each word of the instruction (lowercase) and its part: ASKED where some occurrence is asked text (in "No
    other words should follow this phrase", "other" may still belong to the phrase asked for), else FORBIDDEN
    where some occurrence is forbidden ("Do not include keywords ['the'] in the response"), else DIRECTIVE."""
    parts = read(instruction)
    seen: Dict[str, set] = {}
    for m in _WORD.finditer(instruction):
        span = parts[m.start():m.end()]
        part = FORBIDDEN if FORBIDDEN in span else ASKED if all(p == ASKED for p in span) else DIRECTIVE
        seen.setdefault(m.group(0).lower(), set()).add(part)
    return {word: ASKED if ASKED in found else FORBIDDEN if FORBIDDEN in found else DIRECTIVE
            for word, found in seen.items()}


@dataclass(frozen=True)
class InstructionGuard:
    """The guarded steering's view of one instruction, in token ids of one model.

    ``sources``: the instruction's token sequences as an answer might copy them; ``run_at``: per token of
    ``sources`` (flattened, one -1 separator after each), the run length at which the echo guard applies to it
    (0: never: asked text and the separators); ``capped``: ids never amplified beyond prompting (the directive's
    words); ``forbidden``: ids held to min(l_with, l_without) (the forbidden words)."""

    sources: Tuple[Tuple[int, ...], ...] = ()
    run_at: Tuple[int, ...] = ()
    capped: Tuple[int, ...] = ()
    forbidden: Tuple[int, ...] = ()

    @property
    def flat_tokens(self) -> List[int]:
        out: List[int] = []
        for s in self.sources:
            out.extend(s)
            out.append(-1)
        return out


def _token_parts(text: str, tokens: Sequence[int], piece: Callable[[int], bytes]) -> List[List[str]]:
    """The parts of ``text`` each token covers (by the bytes of its piece); every part DIRECTIVE when the pieces
    do not spell the text (a tokenizer that adds or normalises characters)."""
    parts = read(text)
    by_byte: List[str] = []
    for ch, part in zip(text, parts):
        by_byte.extend([part] * len(ch.encode("utf-8")))
    pieces = [piece(t) for t in tokens]
    spelled = b"".join(pieces)
    encoded = text.encode("utf-8")
    if spelled != encoded:
        lead = len(spelled) - len(encoded)
        if lead > 0 and spelled[lead:] == encoded:  # a space prefix the tokenizer added
            by_byte = [DIRECTIVE] * lead + by_byte
        else:
            return [[DIRECTIVE] for _ in tokens]
    out, pos = [], 0
    for p in pieces:
        out.append(by_byte[pos:pos + len(p)] or [DIRECTIVE])
        pos += len(p)
    return out


def _first_tokens(word: str, tokenize: Callable[[str], List[int]], piece: Callable[[int], bytes]) -> List[int]:
    """The first token of the word as an answer may write it: lowercase, capitalised or upper case, at the start
    of a line or after a space; only where that token spells the word, or at least MIN_GUARDED_WORD characters
    of it (the "S" that starts "SHOULD" starts a thousand other words)."""
    out = []
    for form in dict.fromkeys((word, word.capitalize(), word.upper())):
        for text in (form, " " + form):
            tokens = tokenize(text)
            if not tokens or tokens[0] in out:
                continue
            spelled = piece(tokens[0]).decode("utf-8", "replace").replace("\u2581", " ").strip()
            if len(spelled) >= min(len(form), MIN_GUARDED_WORD):
                out.append(tokens[0])
    return out


def _named_words(instruction: str) -> set:
    """The words an instruction quotes or names ("the word X"), lowercase."""
    named = set()
    for pattern in (_QUOTED, _NAMED_WORD):
        for m in pattern.finditer(instruction):
            named.update(w.lower() for w in _WORD.findall(m.group(m.lastindex or 0)))
    return named


def instruction_guard(instruction: str, tokenize: Callable[[str], List[int]], piece: Callable[[int], bytes], *,
                      echo_run: int, read_parts: bool, cap_directive: bool) -> InstructionGuard:
    """The guard of ``instruction`` for a tokenizer (``tokenize(text)``: plain-text ids, no BOS; ``piece(id)``:
    a token's bytes). ``read_parts`` False: every token is directive and nothing is capped nor forbidden (the
    echo guard alone, as before parts were read)."""
    sources: List[Tuple[int, ...]] = []
    run_at: List[int] = []
    for text in (instruction, " " + instruction):
        tokens = tuple(tokenize(text))
        if not tokens or tokens in sources:
            continue
        sources.append(tokens)
        if read_parts:
            # a token wholly inside asked text is free to copy (forbidden words are held down by id, below)
            run_at.extend(0 if all(p == ASKED for p in token_parts) else echo_run
                          for token_parts in _token_parts(text, tokens, piece))
        else:
            run_at.extend([echo_run] * len(tokens))
        run_at.append(0)  # the separator
    capped: List[int] = []
    forbidden: List[int] = []
    if read_parts:
        named = _named_words(instruction)
        for word, part in words(instruction).items():
            if len(word) < MIN_GUARDED_WORD or (word in STOPWORDS and word not in named):
                continue
            if part == FORBIDDEN:
                forbidden.extend(_first_tokens(word, tokenize, piece))
            elif part == DIRECTIVE and cap_directive:
                capped.extend(_first_tokens(word, tokenize, piece))
    forbidden_set = set(forbidden)
    return InstructionGuard(tuple(sources), tuple(run_at),
                            tuple(sorted(set(capped) - forbidden_set)), tuple(sorted(forbidden_set)))
