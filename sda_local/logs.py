"""Conversation log in SQLite, in the style of the ``llm`` CLI: one row per chat turn.

Each turn is inserted in its own transaction once it is complete (or interrupted), so a crash mid-turn
leaves the database as it was. The database is owner-only (see ``privacy``). Location: $SDA_LOCAL_LOG_DB, else $XDG_DATA_HOME/sda-local/logs.db, else
~/.local/share/sda-local/logs.db.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

from .errors import InputError, SDAError
from .models import sha256_of
from .privacy import create_private_file, private_dir, readable_by_others

LOG_ENV = "SDA_LOCAL_LOG_DB"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    conversation TEXT NOT NULL,
    turn INTEGER NOT NULL,
    time TEXT NOT NULL,
    model_path TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    settings TEXT NOT NULL,
    query TEXT NOT NULL,
    reply TEXT NOT NULL,
    interrupted INTEGER NOT NULL,
    score INTEGER,
    amplifier REAL,
    stats TEXT
);
CREATE TABLE IF NOT EXISTS model_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    sha256 TEXT NOT NULL
);
"""


def log_path() -> Path:
    override = os.environ.get(LOG_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "sda-local" / "logs.db"


class LogWriteError(SDAError):
    """A turn could not be written (database locked by another process, disk full, ...)."""


class ConversationLog:
    """The log database is owner-only: created with mode 0600 (SQLite gives its -wal and -shm files the
    database's mode) in a directory created with mode 0700. An existing database that others can read is
    used as it is, with a warning in ``self.warnings``."""

    def __init__(self, path: Optional[Path] = None, *, busy_timeout: float = 2.0):
        self.path = Path(path) if path else log_path()
        self.warnings: List[str] = []
        try:
            private_dir(self.path.parent)
            exposed = readable_by_others(self.path)
            if exposed:
                self.warnings.append(f"the conversation log {self.path} can be read by {exposed}; "
                                     f"make it private with: chmod 600 {self.path}*")
            create_private_file(self.path)
            # A short busy timeout: another sda-local holding the database must not freeze the chat for long.
            self.db = sqlite3.connect(str(self.path), timeout=busy_timeout)
            self.db.execute("PRAGMA journal_mode=WAL")
            with self.db:
                self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise InputError(f"cannot open the conversation log {self.path}: {exc}") from None

    def model_sha256(self, model_path: Path) -> str:
        """sha256 of a model file, computed once per (path, size, mtime)."""
        st = model_path.stat()
        key = str(model_path.resolve())
        try:
            row = self.db.execute("SELECT size, mtime, sha256 FROM model_hashes WHERE path = ?", (key,)).fetchone()
        except sqlite3.Error:
            row = None
        if row and row[0] == st.st_size and row[1] == st.st_mtime:
            return row[2]
        digest = sha256_of(model_path)
        try:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO model_hashes VALUES (?, ?, ?, ?)",
                                (key, st.st_size, st.st_mtime, digest))
        except sqlite3.Error:
            pass  # only a cache: computed again next time
        return digest

    def record(self, *, conversation: str, turn: int, model_path: str, model_sha256: str, settings: dict,
               query: str, reply: str, interrupted: bool, score: Optional[int], amplifier: Optional[float],
               stats: Optional[dict]) -> None:
        """Insert one turn in its own transaction; LogWriteError when the database refuses it."""
        try:
            self._insert(conversation, turn, model_path, model_sha256, settings, query, reply, interrupted, score,
                         amplifier, stats)
        except sqlite3.Error as exc:
            raise LogWriteError(f"could not write to the conversation log {self.path}: {exc}") from None

    def _insert(self, conversation, turn, model_path, model_sha256, settings, query, reply, interrupted, score,
                amplifier, stats) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO turns (conversation, turn, time, model_path, model_sha256, settings, query, reply,"
                " interrupted, score, amplifier, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation, turn, datetime.now(timezone.utc).isoformat(timespec="seconds"), model_path,
                 model_sha256, json.dumps(settings), query, reply, int(interrupted), score, amplifier,
                 json.dumps(stats) if stats is not None else None),
            )

    def recent(self, n: int) -> List[dict]:
        rows = self.db.execute(
            "SELECT id, conversation, turn, time, model_path, model_sha256, settings, query, reply, interrupted,"
            " score, amplifier, stats FROM turns ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        keys = ("id", "conversation", "turn", "time", "model_path", "model_sha256", "settings", "query", "reply",
                "interrupted", "score", "amplifier", "stats")
        out = []
        for row in reversed(rows):
            d = dict(zip(keys, row))
            d["settings"] = json.loads(d["settings"])
            d["stats"] = json.loads(d["stats"]) if d["stats"] else None
            d["interrupted"] = bool(d["interrupted"])
            out.append(d)
        return out

    def close(self) -> None:
        self.db.close()
