"""Answer quality beside compliance: instruction echo and degeneration (text only), and fluency (the mean
log-probability per token of the answer under the model without the instruction, by teacher forcing).

* **Echo.** An answer echoes its instruction when it repeats a run of ECHO_RUN (4) or more consecutive words
  of the instruction text, where the run is not in the query and not inside a text the instruction asks the
  answer to write out (a keyword, the exact end phrase, the postscript marker: ``required``). ``echo_share``
  is the share of the answer's words that lie in such runs.
* **Degeneration.** Some 3-word sequence occurs DEGENERATE_REPEATS (4) or more times, or, over answers of at
  least DISTINCT_MIN_BIGRAMS (16) word bigrams, the distinct-2 ratio (distinct bigrams / bigrams) is below
  DISTINCT2_MIN (0.5). The first bound is the issue's; both were checked on the prompt-only answers of the
  development set (README, "Steering without echo"), where they flag 5-7 % of the answers, the loops among
  them ("1. Pickle / 2. Pickle / ..."); a bullet list that repeats a 2-word opening stays below them.

* **Clean compliance.** An answer that complies, echoes nothing, does not loop, and reads like text the model
  writes unsteered: fluency at least CLEAN_FLUENCY (-3 nats per token, about the 5th percentile of
  prompting-alone answers on the development set's tuning questions: 4.7 % of them fall below it). A steered
  answer can comply by being a list of the instruction's keywords; this count leaves those out.

Words are lowercase runs of letters, digits and apostrophes, so case and punctuation changes do not hide a copy;
degeneration ignores numbers, so that a numbered list of one item ("1. Pickle / 2. Pickle / ...") is a loop.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import List, NamedTuple, Optional, Sequence, Set, Tuple

from ..errors import InputError, ModelError
from ..prompts import resolve_alignment

ECHO_RUN = 4
DEGENERATE_NGRAM = 3
DEGENERATE_REPEATS = 4
DISTINCT2_MIN = 0.5
DISTINCT_MIN_BIGRAMS = 16
CLEAN_FLUENCY = -3.0

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")  # quotes around a word are not part of it


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def _ngrams(seq: Sequence[str], n: int) -> Set[Tuple[str, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


class Echo(NamedTuple):
    echoed: bool
    share: float  # of the answer's words, those inside echoed runs
    longest: int  # words in the longest echoed run (0 when none)


def echo(answer: str, instruction: str, query: str = "", required: Sequence[str] = ()) -> Echo:
    """Whether ``answer`` repeats ECHO_RUN+ consecutive words of ``instruction`` not found in ``query`` nor in a
    ``required`` text (see the module docstring)."""
    a = words(answer)
    if len(a) < ECHO_RUN:
        return Echo(False, 0.0, 0)
    allowed = _ngrams(words(query), ECHO_RUN)
    for text in required:
        allowed |= _ngrams(words(text), ECHO_RUN)
    source = _ngrams(words(instruction), ECHO_RUN) - allowed
    covered = [False] * len(a)
    for i in range(len(a) - ECHO_RUN + 1):
        if tuple(a[i:i + ECHO_RUN]) in source:
            for j in range(i, i + ECHO_RUN):
                covered[j] = True
    longest = run = 0
    for c in covered:
        run = run + 1 if c else 0
        longest = max(longest, run)
    n = sum(covered)
    return Echo(n > 0, n / len(a), longest)


class Degeneration(NamedTuple):
    degenerate: bool
    max_repeats: int  # occurrences of the most frequent 3-word sequence
    distinct2: float  # distinct bigrams / bigrams (1.0 for answers too short to tell)


def degeneration(answer: str) -> Degeneration:
    a = [w for w in words(answer) if not w.isdigit()]  # list numbers: "1. Pickle 2. Pickle" is a loop
    trigrams = Counter(tuple(a[i:i + DEGENERATE_NGRAM]) for i in range(len(a) - DEGENERATE_NGRAM + 1))
    repeats = max(trigrams.values(), default=0)
    bigrams = [tuple(a[i:i + 2]) for i in range(len(a) - 1)]
    distinct2 = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    low_diversity = len(bigrams) >= DISTINCT_MIN_BIGRAMS and distinct2 < DISTINCT2_MIN
    return Degeneration(repeats >= DEGENERATE_REPEATS or low_diversity, repeats, distinct2)


def clean(complied: bool, echoed: bool, degenerate: bool, fluency_value: Optional[float]) -> bool:
    """Whether a checked answer is a clean compliance (see the module docstring); an answer whose fluency was
    not measured is not."""
    return bool(complied and not echoed and not degenerate and fluency_value is not None
                and fluency_value >= CLEAN_FLUENCY)


def fluency(engine, query: str, instruction: str, text: str) -> Optional[float]:
    """Mean log-probability per token of ``text`` under ``engine``'s model prompted with ``query`` without the
    instruction (the teacher forcing the self judge uses); None for an empty answer or one the forcing context
    cannot hold."""
    tokens = engine.model.tokenize(text, add_bos=False, special=False)
    if not tokens:
        return None
    _, prompt_without = engine.formatter.pair(query, resolve_alignment(instruction))
    try:
        with engine.forcing() as forcing:
            (logprobs,) = forcing.continuation_logprobs([engine.tokenize_prompt(prompt_without)], tokens)
    except (InputError, ModelError):  # an answer longer than the forcing context, non-finite logits
        return None
    return round(float(logprobs.mean()), 4)
