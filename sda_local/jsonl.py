"""Record files that survive a crash: append-only JSONL (batch outputs, eval runs, the judge-bench cache) and
small JSON registries changed by several processes at once (``update_json``: the user catalogue, the llm
plugin's models)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Callable, Dict

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


def read_complete(path: Path) -> bytes:
    """The file's complete lines, leaving the file as it is (a partial last line is dropped in memory only:
    the file may be a run still being written). Raises OSError."""
    data = path.read_bytes()
    return data if not data or data.endswith(b"\n") else data[:data.rfind(b"\n") + 1]


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


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive advisory lock held on ``lock_path`` (created if absent) across processes."""
    with open(lock_path, "a+b") as handle:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_json_object(path: Path) -> Dict:
    """The JSON object in ``path``; {} when the file does not exist. Raises OSError or ValueError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def update_json(path: Path, change: Callable[[Dict], None]) -> Dict:
    """Read the JSON object in ``path``, let ``change`` edit it in place, write it back: under a lock beside the
    file (two processes adding entries at once both keep theirs) and atomically (a temporary file renamed over
    it, so a crash leaves the old file or the new one, never half of one). Returns the new object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(f".{path.name}.lock")):
        data = read_json_object(path)
        change(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return data
