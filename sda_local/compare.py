"""Prompting alone against SDA for one query and one seed (``sda-local generate --compare``).

The prompt-only answer is the with-instruction prompt at a = 0 and the fixed temperature T0 (plain prompting,
token for token); the SDA answer is the pipeline's (its judge sets a unless a strength is given). Both carry
the echo and degeneration flags of quality.py.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from typing import List, Optional

from .evaluation import quality
from .pipeline import AlignmentResult, align
from .prompts import resolve_alignment

SIDE_BY_SIDE_MIN_WIDTH = 100  # below this many columns the answers are stacked


@dataclass
class Comparison:
    query: str
    instruction: str
    seed: int
    prompt_only: object  # GenerationResult
    sda: AlignmentResult

    def flags(self, text: str) -> dict:
        e = quality.echo(text, self.instruction, self.query)
        d = quality.degeneration(text)
        return {"echo": e.echoed, "echo_share": round(e.share, 4), "degenerate": d.degenerate}

    def to_dict(self) -> dict:
        return {"query": self.query, "instruction": self.instruction, "seed": self.seed,
                "prompt_only": {"text": self.prompt_only.text, "stats": self.prompt_only.stats.to_dict(),
                                **self.flags(self.prompt_only.text)},
                "sda": {**self.sda.to_dict(), **self.flags(self.sda.text)}}


def compare_answers(engine, query: str, align_to: str, *, judge, pipeline: dict, options: dict) -> Comparison:
    """Both answers for ``options["seed"]`` (which must be set). ``pipeline``: align()'s amplifier options."""
    alignment = resolve_alignment(align_to, options.get("system"))
    prompt_options = {**options, "strength": 0.0, "temperature_mode": "fixed"}
    prompt_only = engine.generate(query, align_to, **prompt_options)
    sda = align(engine, query, align_to, judge=judge, **pipeline, **options)
    return Comparison(query, alignment.instruction, options["seed"], prompt_only, sda)


def _header(title: str, text: str, c: Comparison, stats) -> List[str]:
    f = c.flags(text)
    flags = ", ".join(name for name in ("echo", "degenerate") if f[name]) or "no echo, no loop"
    line = f"{title}  ({stats.generated_tokens} tokens; {flags})"
    return [line]


def render_comparison(c: Comparison, width: Optional[int] = None) -> str:
    """Two columns on a wide terminal, one above the other on a narrow one."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    s = c.sda.stats
    sda_title = f"SDA  a={c.sda.amplifier:.3g} ({c.sda.amplifier_source}), mean JS={s.mean_js:.4f}"
    left = _header("prompt only  a=0", c.prompt_only.text, c, c.prompt_only.stats)
    right = _header(sda_title, c.sda.text, c, s)
    intro = [f"seed {c.seed}; instruction: {c.instruction}", ""]
    if width < SIDE_BY_SIDE_MIN_WIDTH:
        body = [*left, "-" * min(width, 40), *_wrap(c.prompt_only.text, width), "",
                *right, "-" * min(width, 40), *_wrap(c.sda.text, width)]
        return "\n".join(intro + body)
    column = (width - 3) // 2
    a = [*_wrap(" ".join(left), column), "-" * column, *_wrap(c.prompt_only.text, column)]
    b = [*_wrap(" ".join(right), column), "-" * column, *_wrap(c.sda.text, column)]
    rows = [f"{x:<{column}} | {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)))]
    return "\n".join(intro + rows)


def _wrap(text: str, width: int) -> List[str]:
    lines: List[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=True) or [""])
    return lines
