"""From sampled tokens to text pieces: incremental UTF-8 decoding and stop strings."""

from __future__ import annotations

import codecs
from typing import Sequence, Tuple


class TextAssembler:
    """Turns token bytes into text pieces as they come. With stop strings, text that could be the start
    of one is held back until it is known not to be; ``stopped`` is set when one appears (the text before
    it is kept, the rest dropped)."""

    def __init__(self, stop: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.text_parts = []
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """The text that can be shown now ("" if none)."""
        return self._emit(self._decoder.decode(data))

    def finish(self) -> str:
        """The rest, at the end of the generation."""
        text = self._emit(self._decoder.decode(b"", final=True))
        if not self.stopped and self._held:
            text += self._held
            self.text_parts.append(self._held)
            self._held = ""
        return text

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def _emit(self, new: str) -> str:
        if self.stopped or not new:
            return ""
        if not self._stop:
            self.text_parts.append(new)
            return new
        pending = self._held + new
        cut, found = _first_stop(pending, self._stop)
        if found:
            self.stopped = True
            self._held = ""
            out = pending[:cut]
        else:
            keep = _longest_partial_stop(pending, self._stop)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep:]
        if out:
            self.text_parts.append(out)
        return out


def _first_stop(text: str, stops: Tuple[str, ...]) -> Tuple[int, bool]:
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (min(positions), True) if positions else (len(text), False)


def _longest_partial_stop(text: str, stops: Tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
