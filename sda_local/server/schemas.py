"""The request bodies the server accepts: OpenAI's chat and completion fields, plus a top-level ``sda`` object.

Unknown top-level fields are ignored, as OpenAI-compatible servers do (clients send fields of newer API
versions), except the OpenAI fields that would change the answer and that sda-local does not implement
(``UNSUPPORTED_FIELDS``): those are a 400 naming the field, never silently dropped. Unknown keys inside
``sda`` are refused, because a typo there would silently change what the model is steered toward.
"""

from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..amplifier import AMPLIFIER_MAPS
from ..errors import InputError
from ..engine.fusion import DEFAULT_TEMPERATURE_MODE, MAX_K, MAX_STRENGTH, MAX_T0, TEMPERATURE_MODES
from ..engine.steering import DEFAULT_STEERING, STEERING_MODES
from ..seeds import MAX_SEED

# A request may ask for at most this many new tokens; more is refused (the slot's context bounds it too).
# Without max_tokens a request generates until EOS or until its slot's context is full, as llama-server does.
MAX_COMPLETION_TOKENS = 32768
MAX_TOP_LOGPROBS = 20


def _set(value) -> bool:
    return value is not None and value is not False and value != [] and value != {}


def _no_tools(body: dict) -> bool:
    return not _set(body.get("tools")) and not _set(body.get("functions"))


def _no_tool_call(value, body: dict) -> bool:
    return value is None or value == "none" or (value == "auto" and _no_tools(body))


# OpenAI request fields sda-local does not implement, each with the test (value, whole body) a request must
# pass to be accepted: the field's neutral value, or one without effect (tool_choice "auto" with no tools).
UNSUPPORTED_FIELDS = {
    "tools": lambda v, body: not _set(v),
    "tool_choice": _no_tool_call,
    "functions": lambda v, body: not _set(v),
    "function_call": _no_tool_call,
    "logit_bias": lambda v, body: not _set(v),
    "presence_penalty": lambda v, body: v is None or v == 0,
    "frequency_penalty": lambda v, body: v is None or v == 0,
    "audio": lambda v, body: v is None,
    "modalities": lambda v, body: v is None or list(v) == ["text"],
    "prediction": lambda v, body: v is None,
    "web_search_options": lambda v, body: v is None,
    "best_of": lambda v, body: v is None or v == 1,
    "echo": lambda v, body: v is None or v is False,
    "suffix": lambda v, body: v is None or v == "",
}


class SDAOptions(BaseModel):
    """Per-request SDA (README "Server"): absent, the request is plain generation."""

    model_config = ConfigDict(extra="forbid")

    align: str = Field(min_length=1, max_length=4000)
    strength: Optional[float] = Field(default=None, ge=0, le=MAX_STRENGTH)
    judge: Literal["server", "none"] = "server"
    temperature_mode: Literal[tuple(TEMPERATURE_MODES)] = DEFAULT_TEMPERATURE_MODE  # type: ignore[valid-type]
    t0: Optional[float] = Field(default=None, ge=1e-3, le=MAX_T0)
    k: float = Field(default=2.0, ge=0, le=MAX_K)
    amplifier_map: Literal[tuple(AMPLIFIER_MAPS)] = "sigmoid"  # type: ignore[valid-type]
    on_judge_failure: str = "fixed:0.5"
    # "guarded": the default steering (engine/steering.py, README "Steering without echo"); "paper": the formula.
    steering: Literal[STEERING_MODES] = DEFAULT_STEERING.mode  # type: ignore[valid-type]
    # Stream the judged first answer as reasoning_content deltas, then a line with the score and a.
    show_judging: bool = True
    # Per-token figures of the steered answer in the response: JS divergence, temperature, and the token the
    # with-instruction stream alone ranked first (README "Server").
    token_stats: bool = False

    @field_validator("align")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("on_judge_failure")
    @classmethod
    def _policy(cls, value: str) -> str:
        from ..pipeline import parse_failure_policy

        try:
            parse_failure_policy(value)
        except InputError as exc:  # its message names the accepted forms
            raise ValueError(str(exc)) from None
        return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, List[TextPart]]] = None
    tool_calls: Optional[list] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise InputError(f"content parts of type {part.type!r} are not supported (text only)")
            parts.append(part.text or "")
        return "".join(parts)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict] = None
    schema_: Optional[dict] = Field(default=None, alias="schema")  # llama-server's json_object + schema

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and not isinstance((self.json_schema or {}).get("schema"), dict):
            raise ValueError('type "json_schema" needs json_schema.schema (an object)')
        return self


class _Sampling(BaseModel):
    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, List[str]]] = None
    ignore_eos: bool = False  # llama-server's extension: end-of-generation tokens are never sampled
    n: int = 1
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    sda: Optional[SDAOptions] = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data):
        if isinstance(data, dict):
            for name, accepted in UNSUPPORTED_FIELDS.items():
                if name in data:
                    try:
                        ok = accepted(data[name], data)
                    except TypeError:
                        ok = False
                    if not ok:
                        raise UnsupportedField(name)
        return data

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _no_limit(cls, value):
        return None if value == -1 else value  # llama-server's "no limit" (its web UI sends it)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n = 1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("max_completion_tokens", mode="before")
    @classmethod
    def _no_completion_limit(cls, value):
        return None if value == -1 else value

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def token_limit(self) -> Optional[int]:
        """None: until EOS or the slot's context is full."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprob_count(self) -> Optional[int]:
        """None: no logprobs; else how many alternatives per token (0: the sampled token's only)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_off(cls, value):
        return None if value is False else value  # some clients send false for "none"

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    @property
    def token_limit(self) -> Optional[int]:
        """None: until EOS or the slot's context is full (llama-server's default, not OpenAI's 16)."""
        return self.max_tokens

    @property
    def logprob_count(self) -> Optional[int]:
        return self.logprobs


class UnsupportedField(ValueError):
    """An OpenAI field sda-local does not implement, set to a value that would change the answer."""

    def __init__(self, name: str):
        super().__init__(f"{name} is not supported by sda-local (README \"Server\" lists the fields it refuses)")
        self.field = name
