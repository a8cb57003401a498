"""The request bodies the server accepts: OpenAI's chat and completion fields, plus a top-level ``sda`` object.

Unknown top-level fields are ignored, as OpenAI-compatible servers do (clients send fields of newer API
versions); unknown keys inside ``sda`` are refused, because a typo there would silently change what the
model is steered toward.
"""

from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..amplifier import AMPLIFIER_MAPS
from ..errors import InputError
from ..engine.fusion import DEFAULT_TEMPERATURE_MODE, MAX_K, MAX_STRENGTH, MAX_T0, TEMPERATURE_MODES
from ..engine.steering import DEFAULT_STEERING, STEERING_MODES
from ..seeds import MAX_SEED

# A request may ask for at most this many new tokens; more is refused (the slot's context bounds it too).
MAX_COMPLETION_TOKENS = 32768
DEFAULT_MAX_TOKENS = 512


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


class _Sampling(BaseModel):
    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, List[str]]] = None
    n: int = 1
    user: Optional[str] = None
    sda: Optional[SDAOptions] = None

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
    tools: Optional[list] = None
    tool_choice: Optional[object] = None
    functions: Optional[list] = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value):
        if value:
            raise ValueError("tools and function calling are not supported")
        return value

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]
    echo: bool = False
    suffix: Optional[str] = None

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

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @property
    def token_limit(self) -> int:
        return self.max_tokens or 16
