"""Verifiable instructions: alignment goals whose compliance a program checks, so no judge is involved.

Each instruction is a custom SDA instruction text plus a checker of the answer's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict


@dataclass(frozen=True)
class VerifiableInstruction:
    id: str
    instruction: str
    check: Callable[[str], bool]


def _bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"^\s*[*-]\s+\S", line))


VERIFIABLE: Dict[str, VerifiableInstruction] = {
    v.id: v
    for v in (
        VerifiableInstruction("no_commas", "Do not use any commas in your answer.", lambda t: "," not in t),
        VerifiableInstruction("under_40_words", "Answer in fewer than 40 words.", lambda t: len(t.split()) < 40),
        VerifiableInstruction("lowercase", "Write your entire answer in lowercase letters only.",
                              lambda t: t == t.lower() and any(c.isalpha() for c in t)),
        VerifiableInstruction("keyword_banana", "Include the word 'banana' somewhere in your answer.",
                              lambda t: "banana" in t.lower()),
        VerifiableInstruction("end_phrase", "End your answer with the exact words: Hope this helps!",
                              lambda t: t.strip().endswith("Hope this helps!")),
        VerifiableInstruction("postscript", "At the end of your answer, add a postscript starting with P.S.",
                              lambda t: "P.S." in t),
        VerifiableInstruction("three_bullets", "Answer with a bullet list of exactly 3 items, each starting "
                              "with '* '.", lambda t: _bullets(t) == 3),
    )
}
