"""Judges that score an answer from 1 to 100 under a rubric (SPEC.md sections 1 and 6).

* ``LocalJudge`` runs a GGUF model on this machine: the generation model itself (no second copy of the
  weights) or another one. It decodes greedily under a grammar that admits only ``{"score": N}`` with
  N in 1..100. Why a grammar rather than the expected value over score tokens: a score of 1..100 spans one
  to three tokens whose split differs between tokenizers, so an expected value would need a tokenizer-
  specific tree of forward passes; greedy decoding under a grammar is deterministic, tokenizer-agnostic,
  and can only produce a well-formed, in-range score.
* ``RemoteJudge`` calls an OpenAI-compatible Chat Completions endpoint (OpenAI's GPT-4.1 by default;
  llama-server, ollama, vLLM and llama-cpp-python's server work too) at temperature 0 with a fixed seed,
  with timeouts and bounded retries.

Both read the score from the judge's own reply, parsed strictly as JSON: never from the judged text, and
never by "the first number in the text". Anything else is a ``JudgeError``.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

from .errors import InputError, SDAError
from .rubrics import Rubric, judge_messages, pairwise_messages

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_REMOTE_MODEL = "gpt-4.1"
API_KEY_ENVS = ("SDA_JUDGE_API_KEY", "OPENAI_API_KEY")
SCORE_GRAMMAR = r'''root ::= "{\"score\": " score "}"
score ::= "100" | [1-9] [0-9]? '''
PAIR_GRAMMAR = r'''root ::= "{\"score_a\": " score ", \"score_b\": " score "}"
score ::= "100" | [1-9] [0-9]? '''
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
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class JudgeError(SDAError):
    """The judge gave no usable score (unreachable, refused, malformed or out-of-range reply)."""


@dataclass
class Judgement:
    score: int
    judge: str
    rubric_version: str
    raw: str  # the judge's reply, as parsed
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def parse_scores(text: str, keys: Tuple[str, ...]) -> Tuple[int, ...]:
    """The scores of a reply that must be exactly a JSON object of integer scores 1..100 under ``keys``
    (optionally in a ```json fence)."""
    if not isinstance(text, str) or not text.strip():
        raise JudgeError("the judge's reply is empty")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        obj = json.loads(body)
    except ValueError:
        raise JudgeError(f"the judge's reply is not the JSON score object: {_clip(text)}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise JudgeError(f'the judge\'s reply has no "{missing[0]}": {_clip(text)}')
    scores = []
    for key in keys:
        score = obj[key]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score):
            raise JudgeError(f"the judge's score is not an integer: {score!r}")
        if not 1 <= score <= 100:
            raise JudgeError(f"the judge's score is out of range 1..100: {int(score)}")
        scores.append(int(score))
    return tuple(scores)


def parse_judge_reply(text: str) -> int:
    """The score of a reply that must be exactly ``{"score": N}``."""
    return parse_scores(text, ("score",))[0]


@dataclass
class PairJudgement:
    score_a: int
    score_b: int
    judge: str
    rubric_version: str
    raw: str
    seconds: float


def _clip(text: str, n: int = 80) -> str:
    one_line = " ".join(str(text).split())
    return one_line if len(one_line) <= n else one_line[: n - 3] + "..."


class LocalJudge:
    """Scores with a local GGUF model through an SDAEngine (``owns_engine``: close it with the judge)."""

    def __init__(self, engine, *, name: Optional[str] = None, owns_engine: bool = False):
        self.engine = engine
        self.owns_engine = owns_engine
        self.identity = f"local:{name or engine.model_path.name}"

    def _complete(self, messages, grammar: str, max_tokens: int) -> str:
        system, user = (m["content"] for m in messages)
        try:
            return self.engine.complete_with_grammar(system, user, grammar, max_tokens=max_tokens)
        except InputError as exc:  # e.g. the answer does not fit in the judge's context
            raise JudgeError(f"local judge: {exc}") from None

    def score(self, query: str, answer: str, rubric: Rubric) -> Judgement:
        started = time.perf_counter()
        reply = self._complete(judge_messages(rubric, query, answer), SCORE_GRAMMAR, 16)
        return Judgement(parse_judge_reply(reply), self.identity, rubric.version, reply,
                         time.perf_counter() - started)

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        started = time.perf_counter()
        reply = self._complete(pairwise_messages(rubric, query, answer_a, answer_b), PAIR_GRAMMAR, 32)
        a, b = parse_scores(reply, ("score_a", "score_b"))
        return PairJudgement(a, b, self.identity, rubric.version, reply, time.perf_counter() - started)

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()


def api_key_from_env() -> Optional[str]:
    for name in API_KEY_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return None


class RemoteJudge:
    """OpenAI-compatible Chat Completions judge. The API key goes to ``base_url`` only, and nowhere else."""

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
        max_wait: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import requests

        self._requests = requests
        url = base_url.rstrip("/")
        if not re.match(r"^https?://", url):
            raise InputError(f"the judge URL must start with http:// or https://, got {base_url!r}")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self._api_key = api_key if api_key is not None else api_key_from_env()
        if self._api_key is None and url == OPENAI_URL:
            raise InputError("the OpenAI judge needs an API key: set SDA_JUDGE_API_KEY or OPENAI_API_KEY")
        self.timeout = (connect_timeout, read_timeout)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff = backoff
        self.max_wait = max_wait
        self._sleep = sleep
        self._session = requests.Session()
        self._format_index = 0
        self.identity = f"openai:{model}@{url}"

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteJudge({self.identity!r})"

    def _ask(self, messages, schema: dict) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": 0, "seed": 0, "max_tokens": 48}
        body = self._post(payload, _response_formats(schema))
        try:
            return body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.identity}: the reply has no choices[0].message.content") from None

    def score(self, query: str, answer: str, rubric: Rubric) -> Judgement:
        started = time.perf_counter()
        reply = self._ask(judge_messages(rubric, query, answer), SCORE_SCHEMA)
        return Judgement(parse_judge_reply(reply), self.identity, rubric.version, reply,
                         time.perf_counter() - started)

    def score_pair(self, query: str, answer_a: str, answer_b: str, rubric: Rubric) -> PairJudgement:
        started = time.perf_counter()
        reply = self._ask(pairwise_messages(rubric, query, answer_a, answer_b), PAIR_SCHEMA)
        a, b = parse_scores(reply, ("score_a", "score_b"))
        return PairJudgement(a, b, self.identity, rubric.version, reply, time.perf_counter() - started)

    def _wait_before_retry(self, attempt: int, retry_after: Optional[str]) -> None:
        wait = self.backoff * 2 ** (attempt - 1)
        if retry_after:
            wait = _retry_after_seconds(retry_after, default=wait)
        self._sleep(min(max(wait, 0.0), self.max_wait))

    def _post(self, payload: dict, formats: tuple) -> dict:
        requests = self._requests
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_problem = ""
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            retry_after = None
            response_format = formats[self._format_index]
            if response_format is None:
                payload.pop("response_format", None)
            else:
                payload["response_format"] = response_format
            try:
                response = self._session.post(self.url, json=payload, headers=headers, timeout=self.timeout,
                                              allow_redirects=False)
            except requests.exceptions.Timeout:
                last_problem = "timed out"
            except requests.exceptions.ConnectionError:
                last_problem = "connection failed"
            except requests.exceptions.RequestException as exc:
                raise JudgeError(f"{self.identity}: request failed ({type(exc).__name__})") from None
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise JudgeError(f"{self.identity}: the reply is not JSON") from None
                if status in (400, 422) and self._format_index + 1 < len(formats):
                    self._format_index += 1  # this server speaks another structured-output dialect
                    attempt -= 1
                    continue
                if status == 429 or status >= 500:
                    last_problem = f"HTTP {status}"
                    retry_after = response.headers.get("Retry-After")
                else:
                    hint = " (check the API key)" if status in (401, 403) else ""
                    raise JudgeError(f"{self.identity}: HTTP {status}{hint}")
            if attempt < self.max_attempts:
                self._wait_before_retry(attempt, retry_after)
        raise JudgeError(f"{self.identity}: {last_problem} after {self.max_attempts} attempts")

    def close(self) -> None:
        self._session.close()


def _retry_after_seconds(value: str, default: float) -> float:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return when.timestamp() - time.time()


def make_judge(spec: Optional[str], engine, *, url: Optional[str] = None, **remote_options):
    """A judge from a CLI-style spec: none | local | local:PATH_OR_NAME | openai | openai:MODEL.

    ``engine`` serves ``local``. ``url`` (any OpenAI-compatible base URL) implies ``openai`` when no spec
    is given. Returns None for ``none``.
    """
    if spec is None:
        spec = "openai" if url else "local"
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "none" and not arg:
        return None
    if url and kind != "openai":
        raise InputError("--judge-url only applies to --judge openai[:MODEL]")
    if kind == "local":
        if not arg:
            return LocalJudge(engine)
        from .engine import SDAEngine

        threads = engine.n_threads if engine is not None else None
        judge_engine = SDAEngine(arg, n_ctx=4096, streams="contexts", n_threads=threads)
        return LocalJudge(judge_engine, owns_engine=True)
    if kind == "openai":
        return RemoteJudge(arg or DEFAULT_REMOTE_MODEL, base_url=url or OPENAI_URL, **remote_options)
    raise InputError(f"unknown judge {spec!r} (none, local, local:PATH|NAME, openai, openai:MODEL)")
