"""``RemoteJudge``: an OpenAI-compatible Chat Completions judge (OpenAI's GPT-4.1 by default; llama-server,
ollama, vLLM and llama-cpp-python's server work too), at temperature 0 with a fixed seed, with timeouts and
bounded retries.

Replies over ``MAX_REPLY_BYTES`` are refused without being read whole. The key (or ``user:pass@`` in the
URL) goes to the judge URL only, never over plain http:// to a host that is not this machine unless
allowed, and never into an identity, message or record: those show the URL without its credentials.
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import math
import os
import time
from typing import Callable, Optional
from urllib.parse import unquote, urlsplit

from ..errors import InputError
from ..rubrics import Rubric, judge_messages, pairwise_messages
from .replies import Judgement, JudgeError, PairJudgement, parse_judge_reply, parse_scores, strict_json

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_REMOTE_MODEL = "gpt-4.1"
API_KEY_ENVS = ("SDA_JUDGE_API_KEY", "OPENAI_API_KEY")
# A score reply is a few dozen bytes (max_tokens 48); anything near this is a broken or hostile server,
# and is refused before it is read into memory.
MAX_REPLY_BYTES = 1 << 20
DEFAULT_MAX_WAIT = 60.0
def _schema(*keys: str) -> dict:
    return {
        "type": "object",
        "properties": {k: {"type": "integer", "minimum": 1, "maximum": 100} for k in keys},
        "required": list(keys),
        "additionalProperties": False,
    }


SCORE_SCHEMA = _schema("score")
PAIR_SCHEMA = _schema("score_a", "score_b")
# Structured-output dialects. json_object with a schema is understood by llama-server and llama-cpp-python's
# server (which answers HTTP 500 to a json_schema request) and taken as plain JSON mode by lenient servers;
# OpenAI rejects the extra key with HTTP 400 and gets json_schema next. A server that rejects a dialect
# (400/422) is asked again with the next; the last resort is the prompt's own format request alone.
def _response_formats(schema: dict) -> tuple:
    return (
        {"type": "json_object", "schema": schema},
        {"type": "json_schema", "json_schema": {"name": "score", "strict": True, "schema": schema}},
        None,
    )


def api_key_from_env() -> Optional[str]:
    for name in API_KEY_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def redact_url(url: str) -> str:
    """``url`` without ``user:pass@``: the only form of a judge URL that is shown, logged or recorded."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))  # netloc, as urlsplit
    return f"{scheme}://{rest[:end].rpartition('@')[2]}{rest[end:]}"


def _shown(url: str) -> str:
    """A judge URL for an error message: redacted, or not at all when an "@" is left that may be part of a
    password urlsplit did not see as one (an unencoded "/" or "#" in it)."""
    redacted = redact_url(url)
    return repr(redacted) if "@" not in redacted else "(not shown: it has an unusual user:pass@ part)"


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves this machine."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _positive_finite(name: str, value, *, zero_ok: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise InputError(f"the judge's {name} must be a finite number of seconds {bound}, got {value!r}")
    return number


class _Auth:
    """Sets Authorization on each request. Passed as requests' ``auth`` so that neither credentials in the
    URL nor ~/.netrc replace it."""

    def __init__(self, value: str):
        self._value = value

    def __call__(self, request):
        request.headers["Authorization"] = self._value
        return request


class RemoteJudge:
    """OpenAI-compatible Chat Completions judge. The API key goes to ``base_url`` only, and nowhere else.

    ``base_url`` may carry ``user:pass@`` (HTTP Basic, e.g. a proxy in front of llama-server); they are then
    sent instead of an API key from the environment, and never shown. A key or credentials are refused over
    plain http:// to a host other than this machine unless ``allow_insecure``. ``read_timeout``: seconds
    without a byte from the server; ``max_attempts``: tries per judgement (429, 5xx, timeouts and dropped
    connections are retried); ``max_wait``: the longest pause between tries a server may ask for with
    Retry-After (a longer one fails at once).
    """

    def __init__(
        self,
        model: str = DEFAULT_REMOTE_MODEL,
        *,
        base_url: str = OPENAI_URL,
        api_key: Optional[str] = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_attempts: int = 4,
        backoff: float = 1.0,
        max_wait: float = DEFAULT_MAX_WAIT,
        allow_insecure: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import requests

        from ..privacy import require_network

        require_network("a remote judge")
        self._requests = requests
        base_url = base_url.strip()
        try:
            parts = urlsplit(base_url)
        except ValueError:  # e.g. an unclosed [IPv6 bracket
            raise InputError(f"the judge URL is malformed: {_shown(base_url)}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"the judge URL must be http:// or https:// and name a host, got {_shown(base_url)}")
        try:
            parts.port
        except ValueError:
            raise InputError(f"the judge URL has an invalid port: {_shown(base_url)}") from None
        if parts.query or parts.fragment:  # not shown: a query may carry a key
            raise InputError("the judge URL must be a base URL without ?query or #fragment")
        shown = redact_url(base_url).rstrip("/")  # with no query or fragment, exactly the URL requests get
        self.url = shown if shown.endswith("/chat/completions") else shown + "/chat/completions"
        self.model = model
        credentials = parts.username is not None or parts.password is not None
        if credentials and api_key is not None:
            raise InputError("give the judge either an API key or user:pass@ in its URL, not both")
        if credentials:
            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode("utf-8")
            self._auth = _Auth("Basic " + base64.b64encode(pair).decode("ascii"))
            secret = "the credentials in the judge URL"
        else:
            key = api_key if api_key is not None else api_key_from_env()
            key = key.strip() if key else None  # a pasted key often ends in a newline
            if key is None and shown == OPENAI_URL:
                raise InputError("the OpenAI judge needs an API key: set SDA_JUDGE_API_KEY or OPENAI_API_KEY")
            if key and not (key.isascii() and key.isprintable()):
                raise InputError("the judge API key has characters an HTTP header cannot carry")
            self._auth = _Auth(f"Bearer {key}") if key else None
            secret = "the API key"
        if self._auth is not None and parts.scheme == "http" and not is_loopback_host(parts.hostname) \
                and not allow_insecure:
            raise InputError(f"refusing to send {secret} over plain http:// to {parts.hostname}, which is not "
                             "this machine: use https://, or --allow-insecure-judge (API: allow_insecure=True) "
                             "if the network is trusted")
        self.timeout = (_positive_finite("connect timeout", connect_timeout),
                        _positive_finite("timeout", read_timeout))
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InputError(f"the judge's attempts must be a whole number >= 1, got {max_attempts!r}")
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_wait = _positive_finite("max wait", max_wait, zero_ok=True)
        self._sleep = sleep
        self._session = requests.Session()
        self._format_index = 0
        self.identity = f"openai:{model}@{shown}"

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteJudge({self.identity!r})"

    def _ask(self, messages, schema: dict) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": 0, "seed": 0, "max_tokens": 48}
        body = self._post(payload, _response_formats(schema))
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.identity}: the reply has no choices[0].message.content") from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.identity}: the reply's content is not text but "
                             f"{'null' if content is None else type(content).__name__}")
        return content

    def score(self, query: str, answer: str, rubric: Rubric, history=()) -> Judgement:
        started = time.perf_counter()
        reply = self._ask(judge_messages(rubric, query, answer, history=history), SCORE_SCHEMA)
        return Judgement(parse_judge_reply(reply), self.identity, rubric.version, reply,
                         time.perf_counter() - started)

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        started = time.perf_counter()
        reply = self._ask(pairwise_messages(rubric, query, answer_a, answer_b), PAIR_SCHEMA)
        a, b = parse_scores(reply, ("score_a", "score_b"))
        return PairJudgement(a, b, self.identity, rubric.version, reply, time.perf_counter() - started)

    def _read_body(self, response) -> bytes:
        """The response body, refused unread when it declares more than MAX_REPLY_BYTES, and cut off as soon
        as it goes over (a body without Content-Length)."""
        limit = f"more than the {MAX_REPLY_BYTES // 1024} KiB a score reply may take"
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
            raise JudgeError(f"{self.identity}: the reply is {int(declared)} bytes, {limit}")
        chunks, size = [], 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise JudgeError(f"{self.identity}: the reply is {limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    def _wait(self, attempt: int, status: Optional[int] = None, retry_after: Optional[str] = None) -> float:
        """Seconds before the next try: the server's Retry-After, else exponential backoff, at most max_wait."""
        wait = self.backoff * 2 ** (attempt - 1)
        if retry_after:
            asked = _retry_after_seconds(retry_after, default=wait)
            if asked > self.max_wait:  # retrying sooner than asked would only be refused again
                raise JudgeError(f"{self.identity}: HTTP {status}: the server asks to wait {asked:.0f} s, more "
                                 f"than --judge-max-wait ({self.max_wait:g} s)")
            wait = asked
        return min(max(wait, 0.0), self.max_wait)

    def _post(self, payload: dict, formats: tuple) -> dict:
        requests = self._requests
        last_problem = ""
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            response_format = formats[self._format_index]
            if response_format is None:
                payload.pop("response_format", None)
            else:
                payload["response_format"] = response_format
            try:
                with self._session.post(self.url, json=payload, auth=self._auth, timeout=self.timeout,
                                        allow_redirects=False, stream=True) as response:
                    status = response.status_code
                    body = self._read_body(response) if status == 200 else None
                    retry_after = response.headers.get("Retry-After")
            except requests.exceptions.Timeout:
                last_problem, wait = "timed out", self._wait(attempt)
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError):
                last_problem, wait = "connection failed", self._wait(attempt)
            except requests.exceptions.RequestException as exc:
                raise JudgeError(f"{self.identity}: request failed ({type(exc).__name__})") from None
            else:
                if status == 200:
                    try:
                        return strict_json(body)
                    except ValueError:
                        raise JudgeError(f"{self.identity}: the reply is not JSON") from None
                if status in (400, 422) and self._format_index + 1 < len(formats):
                    self._format_index += 1  # this server speaks another structured-output dialect
                    attempt -= 1
                    continue
                if status == 429 or status >= 500:
                    last_problem, wait = f"HTTP {status}", self._wait(attempt, status, retry_after)
                else:
                    hint = " (check the API key)" if status in (401, 403) else ""
                    raise JudgeError(f"{self.identity}: HTTP {status}{hint}")
            if attempt < self.max_attempts:
                self._sleep(wait)
        attempts = f"{self.max_attempts} attempt{'s' if self.max_attempts != 1 else ''}"
        raise JudgeError(f"{self.identity}: {last_problem} after {attempts}")

    def close(self) -> None:
        self._session.close()


def _retry_after_seconds(value: str, default: float) -> float:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return default
    return when.timestamp() - time.time()


