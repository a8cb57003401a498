"""GGUF files other tools already keep on this machine: ollama's store, LM Studio's models folder and
llama.cpp's download cache. Nothing is copied: a model is used where it lies.

* ollama: ``$OLLAMA_MODELS`` (as ollama honours it; default ``~/.ollama/models``). A model NAME[:TAG] has
  a manifest at ``manifests/registry.ollama.ai/library/NAME/TAG`` (``NAMESPACE/NAME`` for others), whose
  layer of media type ``application/vnd.ollama.image.model`` names the blob ``blobs/sha256-<hex>``.
* LM Studio: ``$SDA_LOCAL_LMSTUDIO_MODELS`` (default ``~/.lmstudio/models``), ``PUBLISHER/REPO/FILE.gguf``.
* llama.cpp: ``$LLAMA_CACHE`` (as llama.cpp honours it; default ``~/.cache/llama.cpp``), ``*.gguf``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

from ..errors import ModelError

OLLAMA_ENV = "OLLAMA_MODELS"
LMSTUDIO_ENV = "SDA_LOCAL_LMSTUDIO_MODELS"
LLAMA_CACHE_ENV = "LLAMA_CACHE"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"


@dataclass(frozen=True)
class FoundModel:
    spec: str    # what --model takes: ollama:NAME:TAG, lmstudio:PUB/REPO/FILE, or a path
    store: str   # "ollama", "lmstudio", "llama.cpp"
    path: Path
    size: int


def _home(*parts: str) -> Path:
    return Path(os.path.expanduser("~")).joinpath(*parts)


def ollama_root() -> Path:
    return Path(os.environ.get(OLLAMA_ENV) or _home(".ollama", "models")).expanduser()


def lmstudio_root() -> Path:
    return Path(os.environ.get(LMSTUDIO_ENV) or _home(".lmstudio", "models")).expanduser()


def llama_cache_root() -> Path:
    return Path(os.environ.get(LLAMA_CACHE_ENV) or _home(".cache", "llama.cpp")).expanduser()


def _manifest_path(name: str) -> Path:
    name, _, tag = name.partition(":")
    if not name:
        raise ModelError("ollama: expected ollama:NAME[:TAG]")
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["library"] + parts
    if len(parts) == 2:
        parts = [OLLAMA_REGISTRY] + parts
    return ollama_root() / "manifests" / Path(*parts) / (tag or "latest")


def ollama_blob(name: str) -> Path:
    """The GGUF blob of an ollama model NAME[:TAG], through its manifest."""
    manifest = _manifest_path(name)
    if not manifest.is_file():
        raise ModelError(f"ollama model {name!r} not found (no manifest at {manifest})")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise ModelError(f"ollama model {name!r}: its manifest {manifest} names no model layer") from None
    blob = ollama_root() / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelError(f"ollama model {name!r}: its manifest points to a missing blob {blob}")
    return blob


def lmstudio_file(ref: str) -> Path:
    path = lmstudio_root() / ref
    if not ref or not path.is_file():
        raise ModelError(f"LM Studio model {ref!r} not found under {lmstudio_root()}")
    return path


def _ollama_models() -> Iterator[FoundModel]:
    base = ollama_root() / "manifests"
    if not base.is_dir():
        return
    for manifest in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = manifest.relative_to(base).parts  # registry, namespace, name, tag
        if len(rel) != 4:
            continue
        registry, namespace, name, tag = rel
        short = name if (registry, namespace) == (OLLAMA_REGISTRY, "library") else (
            f"{namespace}/{name}" if registry == OLLAMA_REGISTRY else f"{registry}/{namespace}/{name}")
        spec = f"{short}:{tag}"
        try:
            blob = ollama_blob(spec)
        except ModelError:
            continue
        yield FoundModel(f"ollama:{spec}", "ollama", blob, blob.stat().st_size)


def _gguf_files(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from sorted(p for p in root.rglob("*.gguf") if p.is_file())


def discovered() -> List[FoundModel]:
    """Every GGUF found in the three stores (none of them need exist)."""
    found = list(_ollama_models())
    root = lmstudio_root()
    found += [FoundModel(f"lmstudio:{p.relative_to(root).as_posix()}", "lmstudio", p, p.stat().st_size)
              for p in _gguf_files(root)]
    found += [FoundModel(str(p), "llama.cpp", p, p.stat().st_size) for p in _gguf_files(llama_cache_root())]
    return found
