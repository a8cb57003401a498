"""Splitting a run over machines: ``--shard I/N`` takes the units whose key hashes to I modulo N (0 <= I < N),
so that N processes started by any job runner (a Slurm array, a Kubernetes indexed Job, GNU parallel) share
the work with no coordination, and ``sda-local merge`` joins their outputs into what one run would have
written.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Optional

from .errors import InputError


class Shard(NamedTuple):
    index: int
    count: int

    def holds(self, key: str) -> bool:
        """Whether this shard has the unit ``key`` (a stable hash: the same on every machine and Python)."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: Optional[str]) -> Optional[Shard]:
    """``"I/N"`` -> Shard(I, N); None -> None."""
    if text is None:
        return None
    head, sep, tail = str(text).partition("/")
    try:
        index, count = int(head), int(tail)
    except ValueError:
        index = count = -1
    if not sep or count < 1 or not 0 <= index < count:
        raise InputError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return Shard(index, count)
