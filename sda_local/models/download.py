"""Downloading a GGUF by URL or Hugging Face reference: streamed, resumable, verified, atomic.

``hf:ORG/REPO/FILE.gguf`` is ``$HF_ENDPOINT/ORG/REPO/resolve/main/FILE.gguf`` (default
https://huggingface.co); ``$HF_TOKEN`` is sent to that host only. The file grows in a partial file beside
the cache, named after the URL, so an interrupted download (a dropped connection, or a later run) resumes
with an HTTP Range request; it is renamed to its final name only once complete, a GGUF (magic bytes) and
matching its sha256: the one given, else the one the server publishes. Hugging Face publishes an LFS file's
sha256 as ``X-Linked-Etag`` (and its size as ``X-Linked-Size``) on the redirect to its CDN, not on the CDN's
answer, so these headers are read from the first response of the redirect chain, as ``huggingface_hub``
reads them. ``requests`` is enough for this, so sda-local does not depend on ``huggingface_hub``.

A plain ``http://`` download needs ``--sha256``: anyone on the path could otherwise hand over any file
(loopback addresses excepted: a local mirror or test server).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlsplit

import requests

from ..errors import InputError, ModelError
from ..privacy import OfflineError, require_network

HF_ENDPOINT_ENV = "HF_ENDPOINT"
HF_TOKEN_ENV = "HF_TOKEN"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
GGUF_MAGIC = b"GGUF"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
ATTEMPTS = 5


def hf_endpoint() -> str:
    return (os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")


def source_url(source: str) -> str:
    """The download URL of ``source``: an http(s) URL as is, or ``hf:ORG/REPO/FILE.gguf``."""
    if source.startswith("hf:"):
        ref = source[3:].strip("/")
        parts = ref.split("/")
        if len(parts) < 3 or not all(parts) or not parts[-1].lower().endswith(".gguf"):
            raise InputError(f"{source!r}: expected hf:ORG/REPO/FILE.gguf")
        org, repo, path = parts[0], parts[1], "/".join(parts[2:])
        return f"{hf_endpoint()}/{org}/{repo}/resolve/main/{path}"
    if source.startswith(("http://", "https://")):
        return source
    raise InputError(f"{source!r} is not a URL or an hf:ORG/REPO/FILE.gguf reference")


def file_name(url: str) -> str:
    name = Path(urlsplit(url).path).name
    return name if name.lower().endswith(".gguf") else f"{name or 'model'}.gguf"


def _headers(url: str) -> dict:
    token = os.environ.get(HF_TOKEN_ENV)
    if token and urlsplit(url).netloc == urlsplit(hf_endpoint()).netloc:
        return {"Authorization": f"Bearer {token}"}
    return {}


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _chain(response: requests.Response):
    """The responses of a request, first (the one to the URL asked for) to last (the one with the body)."""
    return [*response.history, response]


def _secure(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or parts.hostname in LOOPBACK_HOSTS


def _published_sha256(response: requests.Response) -> Optional[str]:
    """The sha256 a response of the chain publishes over a transport that cannot be altered on the way."""
    for header in ("X-Linked-Etag", "ETag"):  # the sha256 over any other ETag (a CDN's may be an MD5)
        for hop in _chain(response):
            if not _secure(hop.url):
                continue
            value = hop.headers.get(header, "").strip()
            value = value[2:] if value.startswith("W/") else value
            value = value.strip('"').lower()
            if _SHA256.match(value):
                return value
    return None


def _published_size(response: requests.Response) -> Optional[int]:
    for hop in _chain(response):
        value = hop.headers.get("X-Linked-Size", "").strip()
        if value.isdigit():
            return int(value)
    return None


def check_transport(url: str, sha256: Optional[str]) -> None:
    """Refuse an unauthenticated transport without a checksum to hold the file to."""
    if sha256 is None and not _secure(url):
        raise InputError(f"{url}: a plain http:// download can be altered on the way; use https:// or give "
                         "--sha256 of the file")


def _refusal(status: int, url: str) -> ModelError:
    if status in (401, 403):
        hint = f"; for a gated or private Hugging Face model set {HF_TOKEN_ENV}" if urlsplit(url).netloc == \
            urlsplit(hf_endpoint()).netloc else ""
        return ModelError(f"{url}: access refused (HTTP {status}){hint}")
    if status == 404:
        return ModelError(f"{url}: not found (HTTP 404)")
    return ModelError(f"{url}: HTTP {status}")


class Progress:
    def __init__(self, total: Optional[int], quiet: bool):
        self.total, self.quiet = total, quiet or not sys.stderr.isatty()
        self._last = 0.0

    def update(self, done: int) -> None:
        if self.quiet or time.monotonic() - self._last < 0.2:
            return
        self._last = time.monotonic()
        if self.total:
            width = 30
            filled = int(width * done / self.total)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done / 1e6:7.1f} / {self.total / 1e6:.1f} MB",
                  end="", file=sys.stderr, flush=True)
        else:
            print(f"\r{done / 1e6:7.1f} MB", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if not self.quiet:
            print(file=sys.stderr, flush=True)


def download(url: str, target: Path, *, sha256: Optional[str] = None, quiet: bool = False,
             timeout: float = 60.0) -> Tuple[Path, str]:
    """Fetch ``url`` into ``target`` (absent until complete and verified); returns (target, sha256)."""
    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise InputError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    check_transport(url, sha256)
    try:
        require_network(f"downloading {url}")
    except OfflineError as exc:
        raise ModelError(str(exc)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{hashlib.sha256(url.encode()).hexdigest()[:16]}.partial"
    expected = sha256.lower() if sha256 else None
    published_size: Optional[int] = None
    total: Optional[int] = None
    progress: Optional[Progress] = None
    attempt = 0
    while True:
        attempt += 1
        have = partial.stat().st_size if partial.exists() else 0
        headers = _headers(url)
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as r:
                if r.status_code == 416 and have:  # the partial file is already complete (or wrong): start over
                    partial.unlink()
                    continue
                if r.status_code not in (200, 206):
                    raise _refusal(r.status_code, url)
                if expected is None:
                    expected = _published_sha256(r)
                if expected is None and not _secure(r.url):
                    raise ModelError(f"{url} redirected to plain http:// ({r.url}) and published no sha256 over "
                                     "https; give --sha256 of the file")
                if published_size is None:
                    published_size = _published_size(r)
                if r.status_code == 200 and have:  # the server ignored the Range: start over
                    have = 0
                if total is None:
                    length = r.headers.get("Content-Length")
                    total = (int(length) + have) if length and length.isdigit() else None
                    progress = Progress(total, quiet)
                if "text/html" in r.headers.get("Content-Type", "").lower() and not have:
                    raise ModelError(f"{url} returned a web page, not a GGUF file (a wrong URL, or a login page?)")
                with open(partial, "ab" if have else "wb") as out:
                    for block in r.iter_content(CHUNK):
                        if not have and out.tell() == 0 and len(block) >= 4 and block[:4] != GGUF_MAGIC:
                            raise ModelError(f"{url} is not a GGUF file (it starts with {block[:16]!r})")
                        out.write(block)
                        progress.update(out.tell())
                if total is not None and partial.stat().st_size < total:
                    raise requests.ConnectionError("the connection closed before the end of the file")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt >= ATTEMPTS:
                if progress:
                    progress.finish()
                raise ModelError(f"{url}: the download failed after {ATTEMPTS} attempts ({type(exc).__name__}); "
                                 "run the same command again to resume it") from None
            time.sleep(min(2 ** (attempt - 1), 8) * 0.25)
        except ModelError:
            if partial.exists():
                partial.unlink()
            raise
        except OSError as exc:
            raise ModelError(f"could not write {partial}: {exc.strerror or exc}") from None
    if progress:
        progress.finish()
    with open(partial, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            partial.unlink()
            raise ModelError(f"{url} is not a GGUF file")
    size = partial.stat().st_size
    if published_size is not None and size != published_size:
        partial.unlink()
        raise ModelError(f"{url}: got {size} bytes, the server published {published_size}; the download was "
                         "deleted")
    digest = sha256_file(partial)
    if expected is not None and digest != expected:
        partial.unlink()
        raise ModelError(f"checksum mismatch for {url}: expected sha256 {expected}, got {digest}; the download "
                         "was deleted")
    os.replace(partial, target)
    return target, digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
