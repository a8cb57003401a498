"""Append-only JSONL files that survive a crash: what batch outputs, eval runs and the judge-bench cache share."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .errors import InputError


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


class Appender:
    """Appends one JSON record per line and makes each durable before returning (flush + fsync), so a
    crash loses at most the line being written; ``read_repaired`` cuts that one off on resume.
    Thread-safe: records from several threads never interleave."""

    def __init__(self, path: Path, *, durable: bool = True):
        try:
            self._out = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        self.path, self.durable = path, durable
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()
            if self.durable:
                os.fsync(self._out.fileno())

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
