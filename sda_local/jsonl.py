"""Append-only JSONL files that survive a crash: what batch outputs, eval runs and the judge-bench cache share."""

from __future__ import annotations

from pathlib import Path


def read_repaired(path: Path) -> bytes:
    """The file's complete lines. A partial last line (a crash mid-write) is cut off the file itself, so the
    next append starts on a fresh line and the lost record is made again. Raises OSError."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return data
